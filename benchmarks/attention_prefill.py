"""Prefill attention benchmark: the Triton causal prefill kernel against PyTorch SDPA and the reference.

``python -m benchmarks.attention_prefill [--quick]``. fp16, head_dim 64, causal, cache slots
``[0, T)`` written: batch 4, 12 heads, T {128, 1024, 4096}. ``fastgpt`` is
:func:`fastgpt.kernels.attention_prefill.prefill_attention`; ``sdpa`` is
``F.scaled_dot_product_attention(is_causal=True)`` (flash backend where it accepts the case);
``reference`` is ``fastgpt.reference.attention``. TFLOP/s counts ``2 * B * H * T^2 * D`` (the
causal half of QK^T and PV). Timing: benchmarks/attention_common.py.

Targets (H100, the ``summary`` key): >= 0.8x SDPA at T >= 1024 and faster at T = 128 (graph timings).
"""

from __future__ import annotations

import torch

from benchmarks.attention_common import (
    HEAD_DIM, cell, derive_common, fmt, fused_qkv, main_of, measure, pick_sdpa_backend, print_summary, result, sdpa_fn,
    setup,
)

BATCH, HEADS = 4, 12
LENGTHS = (128, 1024, 4096)


def prefill_case(B, H, T, dtype, device, iters) -> dict:
    from fastgpt import reference
    from fastgpt.kernels import attention_prefill as AP

    D = HEAD_DIM
    q, k, v = fused_qkv(B, T, H, D, dtype, device)
    k_cache = torch.empty(B, H, T, D, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    row_start = torch.zeros(B, dtype=torch.int32, device=device)
    out = torch.empty(B, T, H, D, device=device, dtype=dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D) views
    backend = pick_sdpa_backend(qt, kt, vt, causal=True)
    fns = {
        "fastgpt": lambda: AP.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out),
        "sdpa": sdpa_fn(qt, kt, vt, True, backend),
        "reference": lambda: reference.attention(q, k, v, k_cache, v_cache, 0, None),
    }
    reps = 5 if T >= 4096 else 10  # calls per captured graph
    return dict(
        kind="prefill", batch=B, heads=H, head_dim=D, seq_len=T, sdpa_backend=backend,
        flops=2.0 * B * H * T * T * D, times=measure(fns, reps, iters),
    )


def derive(row: dict) -> None:
    """TFLOP/s and speed-up columns from the times."""
    ours, sdpa = derive_common(row)
    row["tflops"] = row["flops"] / (ours * 1e-6) / 1e12 if ours else None
    row["sdpa_tflops"] = row["flops"] / (sdpa * 1e-6) / 1e12 if sdpa else None


def target_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    def met(ok):
        return bool(ok) if on_gpu else None  # CPU smoke numbers prove nothing

    out = []
    long_ratios = [r["speedup_vs_sdpa"] for r in rows if r["seq_len"] >= 1024 and r.get("speedup_vs_sdpa") is not None]
    if long_ratios:
        out.append(dict(metric="prefill min speed-up vs SDPA at T >= 1024", value=min(long_ratios),
                        target=">= 0.8", met=met(min(long_ratios) >= 0.8)))
    short = [r["speedup_vs_sdpa"] for r in rows if r["seq_len"] == 128 and r.get("speedup_vs_sdpa") is not None]
    if short:
        out.append(dict(metric="prefill speed-up vs SDPA at T = 128", value=short[0], target="> 1.0", met=met(short[0] > 1.0)))
    if not out:
        out.append(dict(metric="prefill attention benchmark", value="no measurements", target="-", met=None))
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}")
    print(f"times in us: {result['timing']} (eager, launch overhead included, in parentheses)")
    head = f"{'prefill':<18}{'fastgpt':>18}{'sdpa':>18}{'reference':>18}{'TFLOP/s':>8}{'sdpa':>7}{'x sdpa':>8}  sdpa backend"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        name = f"b{r['batch']} h{r['heads']} T{r['seq_len']}"
        print(
            f"{name:<18}{cell(r['times']['fastgpt']):>18}{cell(r['times']['sdpa']):>18}"
            f"{cell(r['times']['reference']):>18}{fmt(r.get('tflops')):>8}{fmt(r.get('sdpa_tflops')):>7}"
            f"{fmt(r.get('speedup_vs_sdpa'), '.2f'):>8}  {r['sdpa_backend']}"
        )
    print_summary(result)


def run(quick: bool) -> dict:
    device, dtype, _copy_bw, iters = setup(quick)
    on_gpu = device.type == "cuda"
    sizes = [(BATCH, HEADS, T) for T in LENGTHS] if on_gpu else [(1, 2, 40)]
    torch.manual_seed(0)
    rows = []
    for B, H, T in sizes:
        rows.append(prefill_case(B, H, T, dtype, device, iters))
        derive(rows[-1])
        print(f"prefill b{B:<3} h{H:<3} T{T:<5} fastgpt {fmt(rows[-1]['fastgpt_us'])} us  sdpa {fmt(rows[-1]['sdpa_us'])} us", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    return result(device, dtype, quick, rows, target_summary(rows, on_gpu))


def main(argv=None) -> dict:
    return main_of(__doc__, "attention_prefill", run, print_table, argv)


if __name__ == "__main__":
    main()
