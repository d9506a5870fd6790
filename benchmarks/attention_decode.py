"""Decode attention benchmark: the Triton flash-decoding kernel against PyTorch SDPA and the reference.

``python -m benchmarks.attention_decode [--quick]``. fp16, head_dim 64, one new token over a full
cache of ``L`` slots: batch {1, 8, 64} x heads {12, 25} x ``L`` {128, 1024, 8192}. ``fastgpt`` is
:func:`fastgpt.kernels.attention_decode.decode_attention` (it also appends the token's K/V to the
cache); ``sdpa`` is ``F.scaled_dot_product_attention`` of the query over the ``L`` cached keys,
with the flash backend forced where it accepts the case (else the default backend; the row
records which); ``reference`` is ``fastgpt.reference.attention``; ``fastgpt_partials`` is the
decode step's form (``combine=False``: the split kernel alone, the combine happens in the
out-projection GEMV, see benchmarks/linear.py's ``triton_combine`` column). Reported: microseconds, K/V
bandwidth (``2 * B * H * L * D * 2`` bytes read / time) in GB/s and as a fraction of the
device-to-device copy bandwidth measured in the same run. Timing: benchmarks/attention_common.py.

LLaMA-shaped rows (grouped-query attention with rotary embedding, ``model`` set): Llama-3.2-1B
(32 query / 8 K/V heads, head_dim 64), Qwen2.5-0.5B (14 / 2, 64) and Llama-3.1-8B (32 / 8, 128)
at batch {1, 8, 64} x ``L`` {1024, 8192} (``--quick``: batch {1, 64} at 8192). ``fastgpt``
rotates q and the new k in its prologue (Llama 3's base-500000 frequencies); ``sdpa`` attends
with ``enable_gqa=True`` over the cache and rotates nothing (its time is a lower bound); bytes
read are ``2 * B * H_kv * L * D * 2``.

Targets (H100, the ``summary`` key): >= 70% of copy bandwidth at batch 64 / L 8192 and never
slower than SDPA at any measured size (graph timings).
"""

from __future__ import annotations

import torch

from benchmarks.attention_common import (
    HEAD_DIM, best_us, cell, derive_common, fmt, fused_qkv, main_of, measure, pick_sdpa_backend, print_summary, result, sdpa_fn,
    setup,
)

BATCHES = (1, 8, 64)
HEADS = (12, 25)
LENGTHS = (128, 1024, 8192)
#: LLaMA-family rows: (model, query heads, K/V heads, head_dim), with rope.
GQA_MODELS = (("llama3.2-1b", 32, 8, 64), ("qwen2.5-0.5b", 14, 2, 64), ("llama3.1-8b", 32, 8, 128))
GQA_LENGTHS = (1024, 8192)
REPS = 20  # calls per captured graph


def gqa_fused_qkv(B, H, H_kv, D, dtype, device):
    """q (B, 1, H, D), k, v (B, 1, H_kv, D): views of one fused projection, as the model makes them."""
    qkv = torch.randn(B, 1, (H + 2 * H_kv) * D, device=device, dtype=dtype)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    return q.unflatten(-1, (H, D)), k.unflatten(-1, (H_kv, D)), v.unflatten(-1, (H_kv, D))


def gqa_sdpa(qt, k_cache, v_cache):
    """(run, backend): SDPA over grouped K/V heads (``enable_gqa``), flash when it accepts them."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, k_cache, v_cache, enable_gqa=True)

    try:
        run_flash()
        return run_flash, "flash"
    except RuntimeError:
        return (lambda: F.scaled_dot_product_attention(qt, k_cache, v_cache, enable_gqa=True)), "default"


def decode_case(B, H, L, dtype, device, iters, *, H_kv=None, D=HEAD_DIM, model=None) -> dict:
    """One row: GPT-2's shape (``H_kv`` None, no rope) or a grouped-query model's (``model``, rope on)."""
    from fastgpt import reference
    from fastgpt.kernels import attention_decode as AD

    grouped = H_kv is not None
    H_kv = H_kv or H
    if grouped:
        q, k, v = gqa_fused_qkv(B, H, H_kv, D, dtype, device)
        rope = (1.0 / 500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)).contiguous()
    else:
        q, k, v = fused_qkv(B, 1, H, D, dtype, device)
        rope = None
    k_cache = torch.randn(B, H_kv, L, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    pos = torch.tensor([L - 1], dtype=torch.int32, device=device)  # the cache is full after this token
    row_start = torch.zeros(B, dtype=torch.int32, device=device)
    workspace = AD.decode_workspace(B, H, D, L, device, n_kv_head=H_kv if grouped else None)
    out = torch.empty(B, 1, H, D, device=device, dtype=dtype)
    qt = q.transpose(1, 2)  # (B, H, 1, D)
    if grouped:
        sdpa, backend = gqa_sdpa(qt, k_cache, v_cache)
    else:
        backend = pick_sdpa_backend(qt, k_cache, v_cache, causal=False)
        sdpa = sdpa_fn(qt, k_cache, v_cache, False, backend)
    fns = {
        "fastgpt": lambda: AD.decode_attention(q, k, v, k_cache, v_cache, pos, row_start, workspace, out=out, rope=rope),
        # The decode step's form: split partials only, the combine left to the out-projection GEMV.
        "fastgpt_partials": lambda: AD.decode_attention(
            q, k, v, k_cache, v_cache, pos, row_start, workspace, combine=False, rope=rope
        ),
        "sdpa": sdpa,
        "reference": lambda: reference.attention(q, k, v, k_cache, v_cache, L - 1, None, rope=rope),
    }
    row = dict(
        kind="decode", batch=B, heads=H, kv_heads=H_kv, head_dim=D, cache_len=L, rope=grouped, model=model,
        n_split=workspace["attn_o"].shape[2], sdpa_backend=backend,
        kv_bytes=2 * B * H_kv * L * D * k_cache.element_size(), times=measure(fns, REPS, iters),
    )
    return row


def row_name(r: dict) -> str:
    if r.get("model"):
        return f"{r['model']} b{r['batch']} L{r['cache_len']}"
    return f"b{r['batch']} h{r['heads']} L{r['cache_len']}"


def derive(row: dict, copy_bw: float | None) -> None:
    """Bandwidth and speed-up columns from the times."""
    ours, sdpa = derive_common(row)
    row["fastgpt_partials_us"] = best_us(row["times"]["fastgpt_partials"]) if "fastgpt_partials" in row["times"] else None
    row["gbs"] = row["kv_bytes"] / (ours * 1e-6) / 1e9 if ours else None
    row["sdpa_gbs"] = row["kv_bytes"] / (sdpa * 1e-6) / 1e9 if sdpa else None
    row["copy_frac"] = row["gbs"] / copy_bw if row["gbs"] and copy_bw else None


def target_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    def met(ok):
        return bool(ok) if on_gpu else None  # CPU smoke numbers prove nothing

    out = []
    for r in rows:
        if r["batch"] == 64 and r["cache_len"] == 8192:
            frac = r.get("copy_frac")
            out.append(dict(
                metric=f"decode {row_name(r)} fraction of copy bandwidth",
                value=frac if frac is not None else "n/a", target=">= 0.70",
                met=met(frac >= 0.7) if frac is not None else None,
            ))
    ratios = [(r["speedup_vs_sdpa"], r) for r in rows if r.get("speedup_vs_sdpa") is not None]
    if ratios:
        worst, r = min(ratios, key=lambda x: x[0])
        slower = [row_name(x).replace(" ", "") for s, x in ratios if s < 1.0]
        out.append(dict(
            metric=f"decode min speed-up vs SDPA over {len(ratios)} sizes (worst {row_name(r)}"
            + (f"; slower at {', '.join(slower)})" if slower else ")"),
            value=worst, target=">= 1.0 at every size", met=met(worst >= 1.0),
        ))
    if not out:
        out.append(dict(metric="decode attention benchmark", value="no measurements", target="-", met=None))
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}  copy bandwidth {fmt(result['copy_bandwidth_gbs'])} GB/s")
    print(f"times in us: {result['timing']} (eager, launch overhead included, in parentheses)")
    head = f"{'decode':<28}{'splits':>7}{'fastgpt':>18}{'sdpa':>18}{'reference':>18}{'GB/s':>8}{'copy%':>7}{'x sdpa':>8}  sdpa backend"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        frac = f"{100 * r['copy_frac']:.0f}%" if r.get("copy_frac") else "-"
        print(
            f"{row_name(r):<28}{r['n_split']:>7}{cell(r['times']['fastgpt']):>18}{cell(r['times']['sdpa']):>18}"
            f"{cell(r['times']['reference']):>18}{fmt(r.get('gbs'), '.0f'):>8}{frac:>7}{fmt(r.get('speedup_vs_sdpa'), '.2f'):>8}  {r['sdpa_backend']}"
        )
    print_summary(result)


def run(quick: bool) -> dict:
    device, dtype, copy_bw, iters = setup(quick)
    on_gpu = device.type == "cuda"
    # (B, H, L, extra): GPT-2's shapes, then the LLaMA-family ones (grouped heads, rope).
    if on_gpu:
        sizes = [(b, h, L, {}) for b in BATCHES for h in HEADS for L in LENGTHS]
        # --quick (the GPU check's stage time limit): batch 1 and 64 at the full length only.
        gqa_sizes = [(1, 8192), (64, 8192)] if quick else [(b, L) for b in BATCHES for L in GQA_LENGTHS]
        sizes += [(b, h, L, dict(H_kv=h_kv, D=d, model=model)) for model, h, h_kv, d in GQA_MODELS for b, L in gqa_sizes]
    else:
        sizes = [(1, 2, 64, {}), (2, 1, 300, {}), (1, 4, 40, dict(H_kv=2, model="gqa-tiny"))]
    torch.manual_seed(0)
    rows = []
    for B, H, L, extra in sizes:
        rows.append(decode_case(B, H, L, dtype, device, iters, **extra))
        derive(rows[-1], copy_bw)
        print(f"decode {row_name(rows[-1]):<28} fastgpt {fmt(rows[-1]['fastgpt_us'])} us  sdpa {fmt(rows[-1]['sdpa_us'])} us", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    return result(device, dtype, quick, rows, target_summary(rows, on_gpu), copy_bandwidth_gbs=copy_bw)


def main(argv=None) -> dict:
    return main_of(__doc__, "attention_decode", run, print_table, argv)


if __name__ == "__main__":
    main()
