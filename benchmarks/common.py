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
import subprocess
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


def cuda_time_ms(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the GPU, timed with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_copy_bandwidth_gbs(device: torch.device | str = "cuda", n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


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
