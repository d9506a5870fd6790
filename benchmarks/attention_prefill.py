"""Prefill attention benchmark: the Triton causal prefill kernel against PyTorch SDPA and the reference.

``python -m benchmarks.attention_prefill [--quick]``. fp16, causal, cache slots ``[0, T)``
written. GPT-2 rows: batch 4, 12 heads, head_dim 64, T {128, 1024, 4096}. LLaMA-family rows
(batch 1, T {1024, 4096}, grouped-query heads and rotary embedding, ``kv_heads < heads``):
Llama-3.2-1B (32 / 8 heads, head_dim 64), Llama-3.1-8B (32 / 8, 128), Qwen2.5-0.5B (14 / 2, 64).
``fastgpt`` is :func:`fastgpt.kernels.attention_prefill.prefill_attention` (with ``rope`` on the
LLaMA rows: q and k rotated, rotated k written to the cache, in the same launch); ``sdpa`` is
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` (flash backend where it accepts
the case) on already-rotated inputs, so it does less work than ``fastgpt`` on the LLaMA rows (no
rotation, no cache write); ``reference`` is ``fastgpt.reference.attention``. TFLOP/s counts
``2 * B * H * T^2 * D`` (the causal half of QK^T and PV over the query heads). Timing:
benchmarks/attention_common.py.

Targets (H100, the ``summary`` key): >= 0.8x SDPA at T >= 1024 and faster at T = 128 (graph timings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.attention_common import (
    HEAD_DIM, cell, derive_common, fmt, fused_qkv, main_of, measure, pick_sdpa_backend, print_summary, result, sdpa_fn,
    setup,
)

BATCH, HEADS = 4, 12
LENGTHS = (128, 1024, 4096)
#: LLaMA-family shapes: name -> (heads, kv_heads, head_dim), run at batch 1 with rope.
LLAMA_SHAPES = {"llama3.2-1b": (32, 8, 64), "llama3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}
LLAMA_LENGTHS = (1024, 4096)


def prefill_case(B, H, T, dtype, device, iters, *, kv_heads=None, head_dim=HEAD_DIM, rope=False, model="gpt2") -> dict:
    from fastgpt import reference
    from fastgpt.kernels import attention_prefill as AP

    D = head_dim
    H_kv = kv_heads or H
    if H_kv == H:
        q, k, v = fused_qkv(B, T, H, D, dtype, device)
    else:
        qkv = torch.randn(B, T, (H + 2 * H_kv) * D, device=device, dtype=dtype)
        q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)  # views, row stride (H+2H_kv)D
    inv_freq = 500000.0 ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D) if rope else None
    k_cache = torch.empty(B, H_kv, T, D, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    row_start = torch.zeros(B, dtype=torch.int32, device=device)
    out = torch.empty(B, T, H, D, device=device, dtype=dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H or H_kv, T, D) views
    backend = pick_sdpa_backend(qt, kt, vt, causal=True) if H_kv == H else _pick_gqa_backend(qt, kt, vt)
    fns = {
        "fastgpt": lambda: AP.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out, rope=inv_freq),
        "sdpa": sdpa_fn(qt, kt, vt, True, backend) if H_kv == H else _sdpa_gqa_fn(qt, kt, vt, backend),
        "reference": lambda: reference.attention(q, k, v, k_cache, v_cache, 0, None, rope=inv_freq),
    }
    reps = 5 if T >= 4096 else 10  # calls per captured graph
    return dict(
        kind="prefill", model=model, batch=B, heads=H, kv_heads=H_kv, head_dim=D, rope=rope, seq_len=T,
        sdpa_backend=backend, flops=2.0 * B * H * T * T * D, times=measure(fns, reps, iters),
    )


def _pick_gqa_backend(q, k, v) -> str:
    """'flash' when SDPA's flash backend takes grouped heads (``enable_gqa``), else 'default'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return "flash"
    except RuntimeError:
        return "default"


def _sdpa_gqa_fn(q, k, v, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "flash":

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def derive(row: dict) -> None:
    """TFLOP/s and speed-up columns from the times."""
    ours, sdpa = derive_common(row)
    row["tflops"] = row["flops"] / (ours * 1e-6) / 1e12 if ours else None
    row["sdpa_tflops"] = row["flops"] / (sdpa * 1e-6) / 1e12 if sdpa else None


def target_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    def met(ok):
        return bool(ok) if on_gpu else None  # CPU smoke numbers prove nothing

    out = []
    gpt2 = [r for r in rows if r.get("model", "gpt2") == "gpt2"]  # the targets were set on these rows
    long_ratios = [r["speedup_vs_sdpa"] for r in gpt2 if r["seq_len"] >= 1024 and r.get("speedup_vs_sdpa") is not None]
    if long_ratios:
        out.append(dict(metric="prefill min speed-up vs SDPA at T >= 1024", value=min(long_ratios),
                        target=">= 0.8", met=met(min(long_ratios) >= 0.8)))
    short = [r["speedup_vs_sdpa"] for r in gpt2 if r["seq_len"] == 128 and r.get("speedup_vs_sdpa") is not None]
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
        if r.get("model", "gpt2") != "gpt2":
            name = f"{r['model']} T{r['seq_len']}"
        print(
            f"{name:<18}{cell(r['times']['fastgpt']):>18}{cell(r['times']['sdpa']):>18}"
            f"{cell(r['times']['reference']):>18}{fmt(r.get('tflops')):>8}{fmt(r.get('sdpa_tflops')):>7}"
            f"{fmt(r.get('speedup_vs_sdpa'), '.2f'):>8}  {r['sdpa_backend']}"
        )
    print_summary(result)


def run(quick: bool) -> dict:
    device, dtype, _copy_bw, iters = setup(quick)
    on_gpu = device.type == "cuda"
    # (model, batch, heads, kv_heads, head_dim, rope, T)
    if on_gpu:
        sizes = [("gpt2", BATCH, HEADS, HEADS, HEAD_DIM, False, T) for T in LENGTHS]
        sizes += [(m, 1, H, H_kv, D, True, T) for m, (H, H_kv, D) in LLAMA_SHAPES.items() for T in LLAMA_LENGTHS]
    else:
        sizes = [("gpt2", 1, 2, 2, HEAD_DIM, False, 40), ("gqa-smoke", 1, 4, 2, HEAD_DIM, True, 40)]
    torch.manual_seed(0)
    rows = []
    for model, B, H, H_kv, D, rope, T in sizes:
        rows.append(prefill_case(B, H, T, dtype, device, iters, kv_heads=H_kv, head_dim=D, rope=rope, model=model))
        derive(rows[-1])
        print(f"prefill {model:<13} b{B:<3} h{H:<3}/{H_kv:<3} d{D:<4} T{T:<5} fastgpt {fmt(rows[-1]['fastgpt_us'])} us"
              f"  sdpa {fmt(rows[-1]['sdpa_us'])} us", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    return result(device, dtype, quick, rows, target_summary(rows, on_gpu))


def main(argv=None) -> dict:
    return main_of(__doc__, "attention_prefill", run, print_table, argv)


if __name__ == "__main__":
    main()
