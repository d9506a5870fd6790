"""Shared pieces of the benchmark suite: result files, device facts, timing, copy bandwidth.

Every benchmark writes one JSON file with top-level ``device``, ``date``, ``commit``, ``versions``
and its measurements, into ``$RESULTS_DIR`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def results_dir() -> Path:
    path = Path(os.environ.get("RESULTS_DIR", REPO_ROOT / "benchmarks" / "results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def result_header(device: torch.device | str | None = None) -> dict:
    """The fields every results file starts with."""
    return {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "versions": versions(),
    }


def write_results(name: str, payload: dict) -> Path:
    """Write ``payload`` (which should start from :func:`result_header`) as ``<name>.json``."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


_L2_FLUSH: dict = {}  # device index -> the buffer time_gpu zeroes to evict the L2


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer of twice the device's L2 (at most 256 MiB), allocated once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2_FLUSH.get(index)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 50 * 2**20
        buf = _L2_FLUSH[index] = torch.empty(min(2 * l2, 256 * 2**20), dtype=torch.uint8, device=device)
    return buf


def _capture(fn) -> torch.cuda.CUDAGraph | None:
    """``fn`` captured in a CUDA graph after a warm-up on a side stream (None when capture fails)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph
    except RuntimeError as exc:  # e.g. an op that synchronises during capture
        print(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
        torch.cuda.synchronize()
        return None


def time_gpu(fn, *, flush_l2: bool = True, warmup: int = 5, iters: int = 30, graph: bool = False) -> float | None:
    """Median microseconds of one ``fn()`` call: the one timer of every kernel benchmark.

    Parameters
    ----------
    fn : the work to time (no arguments). To time ``n`` calls from one graph, let ``fn`` make the
        ``n`` calls and divide the result by ``n``.
    flush_l2 : zero a buffer of twice the L2 before each timed call, so ``fn`` reads its inputs from
        HBM as in a decode step (the memset also keeps the GPU busy while the launch is enqueued,
        so the events time the kernel, not the launch overhead).
    warmup, iters : untimed calls first (compiles, autotuning, workspaces), then timed calls.
    graph : time replays of ``fn`` captured in a CUDA graph (launch overhead removed); None when
        ``fn`` cannot be captured.

    On a machine without CUDA (the benchmarks' ``--cpu`` smoke runs): wall-clock medians, no flush,
    no graph (None).
    """
    if not torch.cuda.is_available():
        if graph:
            return None
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    run = fn
    if graph:
        captured = _capture(fn)
        if captured is None:
            return None
        run = captured.replay
    flush = _l2_flush_buffer(torch.device("cuda", torch.cuda.current_device())) if flush_l2 else None
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


def cuda_time_ms(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` without an L2 flush (:func:`time_gpu`, kept for old callers)."""
    return time_gpu(fn, flush_l2=False, warmup=warmup, iters=iters) / 1e3


def measure_copy_bandwidth_gbs(device: torch.device | str = "cuda", n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_gpu(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


@contextlib.contextmanager
def env_override(**values: str | None):
    """Set (or with None, unset) environment variables for the duration of a block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
