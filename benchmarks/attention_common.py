"""Shared pieces of the attention benchmarks (attention_prefill.py, attention_decode.py).

Timing: every implementation is timed eagerly (launch overhead included) and as ``REPS`` calls
captured in one CUDA graph and replayed (:func:`benchmarks.common.time_gpu`, L2 flushed before each
timed replay; median per call) -- the way the model runs decode. Autotuning and compilation happen
in the eager warm-up calls, before any capture. Without a GPU the scripts run a tiny configuration
on the CPU under the Triton interpreter (to exercise them; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.common import measure_copy_bandwidth_gbs, result_header, time_gpu, write_results

HEAD_DIM = 64
IMPLS = ("fastgpt", "sdpa", "reference")


def setup(quick: bool) -> tuple[torch.device, torch.dtype, float | None, tuple[int, int]]:
    """(device, dtype, copy bandwidth GB/s or None, (warmup, iters)); on the CPU, the interpreter."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The kernels can only run on the CPU under the interpreter, which must be set on import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("No GPU: this benchmark needs a CUDA GPU. Running a tiny CPU configuration under the "
              "Triton interpreter to exercise the script; the numbers mean nothing.")
    device = torch.device("cuda" if on_gpu else "cpu")
    copy_bw = measure_copy_bandwidth_gbs(device) if on_gpu else None
    iters = (2, 8) if quick or not on_gpu else (5, 30)
    return device, torch.float16 if on_gpu else torch.float32, copy_bw, iters


def fused_qkv(B, T, H, D, dtype, device):
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype)
    return qkv.view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) views, row stride 3*H*D


def pick_sdpa_backend(q, k, v, causal: bool) -> str:
    """'flash' when SDPA's flash backend accepts these inputs, else 'default'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return "flash"
    except RuntimeError:
        return "default"


def sdpa_fn(q, k, v, causal: bool, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "flash":

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def measure(fns: dict, reps: int, iters: tuple[int, int]) -> dict:
    """{impl: {eager_us, graph_us} or {error}} for each implementation (graph_us None on the CPU)."""
    warmup, n = iters
    out = {}
    for name, fn in fns.items():
        try:
            eager = time_gpu(fn, warmup=warmup, iters=n)  # the warm-up also autotunes / compiles
            graph = time_gpu(lambda fn=fn: [fn() for _ in range(reps)], warmup=0, iters=n, graph=True)
            out[name] = dict(eager_us=eager, graph_us=None if graph is None else graph / reps)
        except Exception as exc:  # one implementation failing must not lose the others
            out[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    return out


def best_us(m: dict) -> float | None:
    """The time the targets use: graph timing on the GPU, eager on the CPU."""
    if "error" in m:
        return None
    return m["graph_us"] if m.get("graph_us") is not None else m["eager_us"]


def derive_common(row: dict) -> tuple[float | None, float | None]:
    """Fill fastgpt_us / sdpa_us / reference_us / speedup_vs_sdpa; returns (ours, sdpa)."""
    t = {name: best_us(m) for name, m in row["times"].items()}
    ours, sdpa = t.get("fastgpt"), t.get("sdpa")
    row["fastgpt_us"], row["sdpa_us"], row["reference_us"] = ours, sdpa, t.get("reference")
    row["speedup_vs_sdpa"] = sdpa / ours if ours and sdpa else None
    return ours, sdpa


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def cell(m: dict) -> str:
    """``best (eager)`` microseconds of one implementation, or ``error``."""
    if "error" in m:
        return "error"
    return f"{fmt(best_us(m))} ({fmt(m['eager_us'], '.0f')})"


def print_summary(result: dict) -> None:
    errors = [(r, name, m["error"]) for r in result["rows"] for name, m in r["times"].items() if "error" in m]
    for r, name, err in errors:
        print(f"error in {name}: {err}")
    print("\nsummary")
    for s in result["summary"]:
        value = fmt(s["value"], ".3f") if isinstance(s["value"], float) else s["value"]
        print(f"  {s['metric']}: {value} (target {s['target']}) met={s['met']}")


def result(device: torch.device, dtype: torch.dtype, quick: bool, rows: list[dict], summary: list[dict], **extra) -> dict:
    """The results file of one attention benchmark run."""
    on_gpu = device.type == "cuda"
    return dict(
        result_header(device),
        dtype=str(dtype).replace("torch.", ""),
        timing="CUDA-graph replay, L2 flushed, median per call" if on_gpu else "CPU wall clock, Triton interpreter (smoke run)",
        quick=quick,
        **extra,
        rows=rows,
        summary=summary,
    )


def main_of(doc: str, name: str, run, print_table, argv=None) -> dict:
    """The command line of an attention benchmark: run, print the table, write ``<name>[_cpu].json``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing iterations (make gpu-check)")
    p.add_argument("--name", default=name, help="results file name (without .json)")
    args = p.parse_args(argv)
    out = run(args.quick)
    print_table(out)
    write_results(args.name if torch.cuda.is_available() else f"{args.name}_cpu", out)
    return out
