"""Attention benchmark: the Triton prefill/decode kernels against PyTorch SDPA and the reference.

``python -m benchmarks.attention [--quick]``. fp16, head_dim 64, in one run:

* decode (one new token over a full cache of ``L`` slots): batch {1, 8, 64} x heads {12, 25} x
  ``L`` {128, 1024, 8192}. ``fastgpt`` is :func:`kernels.attention.decode_attention` (it also
  appends the token's K/V to the cache); ``sdpa`` is ``F.scaled_dot_product_attention`` of the
  query over the ``L`` cached keys, with the flash backend forced where it accepts the case (else
  the default backend; the row records which); ``reference`` is ``fastgpt.reference.attention``.
  Reported: microseconds, K/V bandwidth (``2 * B * H * L * D * 2`` bytes read / time) in GB/s and
  as a fraction of the device-to-device copy bandwidth measured in the same run.
* prefill (causal, cache slots ``[0, T)`` written): batch 4, 12 heads, T {128, 1024, 4096};
  TFLOP/s counts ``2 * B * H * T^2 * D`` (the causal half of QK^T and PV).

Timing: every implementation is captured ``REPS`` times in one CUDA graph and the graph replayed
(``cuda_time_ms``; median), giving GPU time without Python launch overhead -- the way the model
runs decode. Eager times (launch overhead included) are reported beside them. Autotuning and
compilation happen in an eager call before any capture, outside the timed region.

Targets (H100, the ``summary`` key): decode >= 70% of copy bandwidth at batch 64 / L 8192 and never
slower than SDPA at any measured size; prefill >= 0.8x SDPA at T >= 1024 and faster at T = 128
(graph timings).

Without a GPU it runs a tiny configuration on the CPU under the Triton interpreter (to exercise the
script; the numbers mean nothing) and says so.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import cuda_time_ms, measure_copy_bandwidth_gbs, result_header, write_results

DECODE_BATCHES = (1, 8, 64)
DECODE_HEADS = (12, 25)
DECODE_LENGTHS = (128, 1024, 8192)
PREFILL_T = (128, 1024, 4096)
PREFILL_BATCH, PREFILL_HEADS = 4, 12
HEAD_DIM = 64
IMPLS = ("fastgpt", "sdpa", "reference")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class Timer:
    """GPU: eager and CUDA-graph medians (ms per call). CPU: wall-clock medians (smoke run only)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.warmup, self.iters = (2, 8) if quick else (5, 30)

    def eager_ms(self, fn) -> float:
        if self.device.type == "cuda":
            return cuda_time_ms(fn, warmup=self.warmup, iters=self.iters)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]

    def graph_ms(self, fn, reps: int) -> float | None:
        """Median ms per call of ``fn`` replayed ``reps`` times from one CUDA graph (None on CPU)."""
        if self.device.type != "cuda":
            return None
        # Warm-up on a side stream (PyTorch's recipe), then capture `reps` calls.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        ms = cuda_time_ms(graph.replay, warmup=self.warmup, iters=self.iters) / reps
        del graph
        return ms


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


def measure(timer: Timer, fns: dict, reps: int) -> dict:
    """{impl: {eager_us, graph_us} or {error}} for each implementation."""
    out = {}
    for name, fn in fns.items():
        try:
            eager = timer.eager_ms(fn)  # also the autotune/compile call, before any capture
            graph = timer.graph_ms(fn, reps)
            out[name] = dict(eager_us=eager * 1e3, graph_us=None if graph is None else graph * 1e3)
        except Exception as exc:  # one implementation failing must not lose the others
            out[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    return out


def best_us(m: dict) -> float | None:
    """The time the targets use: graph timing on the GPU, eager on the CPU."""
    if "error" in m:
        return None
    return m["graph_us"] if m.get("graph_us") is not None else m["eager_us"]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
def fused_qkv(B, T, H, D, dtype, device):
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype)
    return qkv.view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) views, row stride 3*H*D


def decode_case(attn, reference, timer, B, H, L, dtype, device, reps) -> dict:
    D = HEAD_DIM
    q, k, v = fused_qkv(B, 1, H, D, dtype, device)
    k_cache = torch.randn(B, H, L, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    pos = torch.tensor([L - 1], dtype=torch.int32, device=device)  # the cache is full after this token
    row_start = torch.zeros(B, dtype=torch.int32, device=device)
    workspace = attn.decode_workspace(B, H, D, L, device)
    out = torch.empty(B, 1, H, D, device=device, dtype=dtype)
    qt = q.transpose(1, 2)  # (B, H, 1, D)
    backend = pick_sdpa_backend(qt, k_cache, v_cache, causal=False)
    fns = {
        "fastgpt": lambda: attn.decode_attention(q, k, v, k_cache, v_cache, pos, row_start, workspace, out=out),
        "sdpa": sdpa_fn(qt, k_cache, v_cache, False, backend),
        "reference": lambda: reference.attention(q, k, v, k_cache, v_cache, L - 1, None),
    }
    times = measure(timer, fns, reps)
    kv_bytes = 2 * B * H * L * D * k_cache.element_size()
    return dict(
        kind="decode", batch=B, heads=H, head_dim=D, cache_len=L, n_split=workspace["attn_o"].shape[2],
        sdpa_backend=backend, kv_bytes=kv_bytes, times=times,
    )


def prefill_case(attn, reference, timer, B, H, T, dtype, device, reps) -> dict:
    D = HEAD_DIM
    q, k, v = fused_qkv(B, T, H, D, dtype, device)
    k_cache = torch.empty(B, H, T, D, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    row_start = torch.zeros(B, dtype=torch.int32, device=device)
    out = torch.empty(B, T, H, D, device=device, dtype=dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D) views
    backend = pick_sdpa_backend(qt, kt, vt, causal=True)
    fns = {
        "fastgpt": lambda: attn.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out),
        "sdpa": sdpa_fn(qt, kt, vt, True, backend),
        "reference": lambda: reference.attention(q, k, v, k_cache, v_cache, 0, None),
    }
    times = measure(timer, fns, reps)
    return dict(
        kind="prefill", batch=B, heads=H, head_dim=D, seq_len=T, sdpa_backend=backend,
        flops=2.0 * B * H * T * T * D, times=times,
    )


def derive(row: dict, copy_bw: float | None) -> None:
    """Add bandwidth / TFLOP/s / speed-up columns computed from the times."""
    t = {name: best_us(m) for name, m in row["times"].items()}
    ours, sdpa = t.get("fastgpt"), t.get("sdpa")
    row["fastgpt_us"], row["sdpa_us"], row["reference_us"] = ours, sdpa, t.get("reference")
    row["speedup_vs_sdpa"] = sdpa / ours if ours and sdpa else None
    if row["kind"] == "decode":
        row["gbs"] = row["kv_bytes"] / (ours * 1e-6) / 1e9 if ours else None
        row["sdpa_gbs"] = row["kv_bytes"] / (sdpa * 1e-6) / 1e9 if sdpa else None
        row["copy_frac"] = row["gbs"] / copy_bw if row["gbs"] and copy_bw else None
    else:
        row["tflops"] = row["flops"] / (ours * 1e-6) / 1e12 if ours else None
        row["sdpa_tflops"] = row["flops"] / (sdpa * 1e-6) / 1e12 if sdpa else None


# --------------------------------------------------------------------------------------------
# Summary and table
# --------------------------------------------------------------------------------------------
def target_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    def met(ok):
        return bool(ok) if on_gpu else None  # CPU smoke numbers prove nothing

    out = []
    dec = [r for r in rows if r["kind"] == "decode"]
    pre = [r for r in rows if r["kind"] == "prefill"]
    for r in dec:
        if r["batch"] == 64 and r["cache_len"] == 8192:
            frac = r.get("copy_frac")
            out.append(dict(
                metric=f"decode b64 h{r['heads']} L8192 fraction of copy bandwidth",
                value=frac if frac is not None else "n/a", target=">= 0.70",
                met=met(frac is not None and frac >= 0.7) if frac is not None else None,
            ))
    ratios = [(r["speedup_vs_sdpa"], r) for r in dec if r.get("speedup_vs_sdpa") is not None]
    if ratios:
        worst, r = min(ratios, key=lambda x: x[0])
        slower = [f"b{x['batch']}h{x['heads']}L{x['cache_len']}" for s, x in ratios if s < 1.0]
        out.append(dict(
            metric=f"decode min speed-up vs SDPA over {len(ratios)} sizes (worst b{r['batch']} h{r['heads']} L{r['cache_len']}"
            + (f"; slower at {', '.join(slower)})" if slower else ")"),
            value=worst, target=">= 1.0 at every size", met=met(worst >= 1.0),
        ))
    long_ratios = [r["speedup_vs_sdpa"] for r in pre if r["seq_len"] >= 1024 and r.get("speedup_vs_sdpa") is not None]
    if long_ratios:
        out.append(dict(metric="prefill min speed-up vs SDPA at T >= 1024", value=min(long_ratios),
                        target=">= 0.8", met=met(min(long_ratios) >= 0.8)))
    short = [r["speedup_vs_sdpa"] for r in pre if r["seq_len"] == 128 and r.get("speedup_vs_sdpa") is not None]
    if short:
        out.append(dict(metric="prefill speed-up vs SDPA at T = 128", value=short[0], target="> 1.0", met=met(short[0] > 1.0)))
    if not out:
        out.append(dict(metric="attention benchmark", value="no measurements", target="-", met=None))
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}  copy bandwidth {_fmt(result['copy_bandwidth_gbs'])} GB/s")
    print(f"times in us: {result['timing']} (eager, launch overhead included, in parentheses)")
    head = f"{'decode':<18}{'splits':>7}{'fastgpt':>18}{'sdpa':>18}{'reference':>18}{'GB/s':>8}{'copy%':>7}{'x sdpa':>8}  sdpa backend"
    print(head)
    print("-" * len(head))

    def cell(m):
        if "error" in m:
            return "error"
        return f"{_fmt(best_us(m))} ({_fmt(m['eager_us'], '.0f')})"

    for r in result["rows"]:
        if r["kind"] != "decode":
            continue
        frac = f"{100 * r['copy_frac']:.0f}%" if r.get("copy_frac") else "-"
        name = f"b{r['batch']} h{r['heads']} L{r['cache_len']}"
        print(
            f"{name:<18}{r['n_split']:>7}{cell(r['times']['fastgpt']):>18}{cell(r['times']['sdpa']):>18}"
            f"{cell(r['times']['reference']):>18}{_fmt(r.get('gbs'), '.0f'):>8}{frac:>7}{_fmt(r.get('speedup_vs_sdpa'), '.2f'):>8}  {r['sdpa_backend']}"
        )
    head = f"{'prefill':<18}{'':>7}{'fastgpt':>18}{'sdpa':>18}{'reference':>18}{'TFLOP/s':>8}{'sdpa':>7}{'x sdpa':>8}  sdpa backend"
    print("\n" + head)
    print("-" * len(head))
    for r in result["rows"]:
        if r["kind"] != "prefill":
            continue
        name = f"b{r['batch']} h{r['heads']} T{r['seq_len']}"
        print(
            f"{name:<18}{'':>7}{cell(r['times']['fastgpt']):>18}{cell(r['times']['sdpa']):>18}"
            f"{cell(r['times']['reference']):>18}{_fmt(r.get('tflops')):>8}{_fmt(r.get('sdpa_tflops')):>7}"
            f"{_fmt(r.get('speedup_vs_sdpa'), '.2f'):>8}  {r['sdpa_backend']}"
        )
    errors = [(r, name, m["error"]) for r in result["rows"] for name, m in r["times"].items() if "error" in m]
    for r, name, err in errors:
        print(f"error in {r['kind']} {name}: {err}")
    print("\nsummary")
    for s in result["summary"]:
        value = _fmt(s["value"], ".3f") if isinstance(s["value"], float) else s["value"]
        print(f"  {s['metric']}: {value} (target {s['target']}) met={s['met']}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def run(quick: bool) -> dict:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The kernels can only run on the CPU under the interpreter, which must be set on import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("No GPU: this benchmark needs a CUDA GPU. Running a tiny CPU configuration under the "
              "Triton interpreter to exercise the script; the numbers mean nothing.")
    from fastgpt import reference
    from fastgpt.kernels import attention as attn

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.float16 if on_gpu else torch.float32
    timer = Timer(device, quick)
    copy_bw = measure_copy_bandwidth_gbs(device) if on_gpu else None
    if on_gpu:
        decode_sizes = [(b, h, L) for b in DECODE_BATCHES for h in DECODE_HEADS for L in DECODE_LENGTHS]
        prefill_sizes = [(PREFILL_BATCH, PREFILL_HEADS, T) for T in PREFILL_T]
    else:
        decode_sizes, prefill_sizes = [(1, 2, 64), (2, 1, 300)], [(1, 2, 40)]
    torch.manual_seed(0)
    rows = []
    for B, H, L in decode_sizes:
        rows.append(decode_case(attn, reference, timer, B, H, L, dtype, device, reps=20))
        derive(rows[-1], copy_bw)
        print(f"decode  b{B:<3} h{H:<3} L{L:<5} fastgpt {_fmt(rows[-1]['fastgpt_us'])} us  sdpa {_fmt(rows[-1]['sdpa_us'])} us", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    for B, H, T in prefill_sizes:
        rows.append(prefill_case(attn, reference, timer, B, H, T, dtype, device, reps=5 if T >= 4096 else 10))
        derive(rows[-1], copy_bw)
        print(f"prefill b{B:<3} h{H:<3} T{T:<5} fastgpt {_fmt(rows[-1]['fastgpt_us'])} us  sdpa {_fmt(rows[-1]['sdpa_us'])} us", flush=True)
    return dict(
        result_header(device),
        dtype=str(dtype).replace("torch.", ""),
        timing="CUDA-graph replay, median per call" if on_gpu else "CPU wall clock, Triton interpreter (smoke run)",
        quick=quick,
        copy_bandwidth_gbs=copy_bw,
        rows=rows,
        summary=target_summary(rows, on_gpu),
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing iterations (make gpu-check)")
    p.add_argument("--name", default="attention", help="results file name (without .json)")
    args = p.parse_args(argv)
    result = run(args.quick)
    print_table(result)
    write_results(args.name if torch.cuda.is_available() else f"{args.name}_cpu", result)
    return result


if __name__ == "__main__":
    main()
