"""cuBLAS against the fused Triton GEMV on GPT-2's and Llama-3.2-1B's decode shapes.

``python -m benchmarks.linear [--quick | --dry-run]``. M (= batch at decode) in {1, 8}. GPT-2 small
and XL (fp16): the four layer projections (the LM heads too without ``--quick``), each with the
epilogue it has in the model (ln_1 + QKV + bias; out-proj + bias + residual; ln_2 + FC + bias +
GELU; proj + bias + residual; ln_f + LM head). Llama-3.2-1B (bf16, hidden 2048, 32 query / 8 K/V
heads of 64, MLP 8192, vocabulary 128,256): RMSNorm + QKV (N 3072); o_proj + residual (the
``attn_proj`` row); RMSNorm + gate_up (the row-interleaved (16384, 2048) weight) + silu_glu;
down (K 8192) + residual; RMSNorm + LM head (N 128,256, without ``--quick``; ``--quick`` also runs
these rows at M = 1 only). Per shape:

* ``gemv``: the bare product with its bias -- ``torch.addmm`` (cuBLAS) vs the Triton GEMV
  (:func:`kernels.linear.linear`, bias only): microseconds, the weight-read bandwidth
  ``N*K*2 bytes / time`` in GB/s and as a fraction of the device-to-device copy bandwidth
  measured in the same run (``copy_bandwidth_gbs``, read + write bytes, as in benchmarks.common);
* ``fused``: the op as the model runs it -- :func:`kernels.linear.cublas_linear` (LayerNorm
  kernel + cuBLAS + torch epilogue) vs the one fused GEMV launch;
* ``triton_fused_nopdl``: the fused op with programmatic dependent launch off (``FASTGPT_PDL=0``;
  the timed graph chains ``REPS`` dependent calls, so PDL's overlap of one call's weight stream
  with the previous call's tail shows as the difference);
* ``triton_combine`` (out-projection only): the op as a decode step runs it, its ``x`` combined
  in the prologue from the decode attention's split partials (B = M, head_dim 64, a 1024-slot
  cache at :func:`~fastgpt.kernels.attention_decode.decode_num_splits` splits, every split valid),
  PDL on and off;
* ``plan``: what :func:`fastgpt.kernels.linear_plan.plan` measures and chooses for the shape (without
  ``--quick``, with ``FASTGPT_LINEAR=tune``: every tile at two splits; ``--quick`` uses the
  default Triton config to keep the compile count down).

Timing: ``REPS`` calls captured in one CUDA graph (the way decode runs), each call on a
different copy of the weight so that the copies together exceed twice the L2 cache: every call
reads its weight from HBM, as in a real decode step. Median of several replays / REPS.

Targets (``summary``): the bare Triton GEMV reads at >= 70% of the copy bandwidth at M = 1 on
GPT-2 small's four shapes (small matrices are launch-latency bound; read the numbers, not only
the flag) and >= 80% on GPT-2 XL's FC; the fused op is not slower than the cuBLAS path; the four
fused Llama-3.2-1B layer ops together (at the plan's choice, M = 1) read their weights at >= 75%
of the copy bandwidth (issue 15's decode target is 75% of the roofline).
Without a GPU it prints that it needs one and exits 0; ``--dry-run`` instead runs every column on
tiny shapes (C = 128, vocabulary 301, M in {1, 2}, both families) under the Triton interpreter on the CPU,
checks the Triton results against the cuBLAS path's and writes nothing (what CI runs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from benchmarks.common import env_override, measure_copy_bandwidth_gbs, result_header, time_gpu, write_results

#: (model, op, N, K, epilogue, dtype) at GPT-2 small (C = 768) and XL (C = 1600) in fp16, and
#: Llama-3.2-1B (C = 2048) in bf16; ``dry_run``: C = 128 for both families. ``epilogue``: the
#: "+"-joined stages: ln (LayerNorm) / rms (RMSNorm), bias, gelu / silu_glu, residual.
def shapes(include_lm_head: bool, dry_run: bool = False) -> list[tuple[str, str, int, int, str, torch.dtype]]:
    out = []
    vocab = 301 if dry_run else 50257
    for model, C in (("tiny", 128),) if dry_run else (("gpt2", 768), ("gpt2-xl", 1600)):
        out += [
            (model, "qkv", 3 * C, C, "ln+bias", torch.float16),
            (model, "attn_proj", C, C, "bias+residual", torch.float16),
            (model, "fc", 4 * C, C, "ln+bias+gelu", torch.float16),
            (model, "mlp_proj", C, 4 * C, "bias+residual", torch.float16),
        ]
        if include_lm_head:
            out.append((model, "lm_head", vocab, C, "ln", torch.float16))
    # LLaMA family: hidden C, H_kv = H / 4 K/V heads (q + k + v = 1.5 C), MLP F = 4 C.
    model, C, F, vocab = ("tiny-llama", 128, 256, 301) if dry_run else ("llama-3.2-1b", 2048, 8192, 128256)
    out += [
        (model, "qkv", C + 2 * (C // 4), C, "rms", torch.bfloat16),
        (model, "attn_proj", C, C, "residual", torch.bfloat16),
        (model, "gate_up", 2 * F, C, "rms+silu_glu", torch.bfloat16),
        (model, "down", C, F, "residual", torch.bfloat16),
    ]
    if include_lm_head:
        out.append((model, "lm_head", vocab, C, "rms", torch.bfloat16))
    return out


REPS_MIN = 24
REPLAYS = 7


def _graph_us(fn, n_calls: int, *, pdl: bool = True) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(n_calls), replayed from one graph
    (on the CPU: wall-clock of one eager pass), with programmatic dependent launch on or off."""
    with env_override(FASTGPT_PDL="1" if pdl else "0"):
        on_gpu = torch.cuda.is_available()
        us = time_gpu(lambda: [fn(i) for i in range(n_calls)], warmup=1 if on_gpu else 0, iters=REPLAYS if on_gpu else 1, graph=on_gpu)
    if us is None:
        raise RuntimeError("the linear op could not be captured in a CUDA graph")
    return us / n_calls


def _attention_partials(M: int, C: int, dev: torch.device, dtype: torch.dtype):
    """Decode attention partials for ``M`` rows of ``C = H * 64`` features (the out-projection's x)."""
    import fastgpt.kernels.attention_decode as AD

    H, D, S_max = C // 64, 64, 1024
    q, k, v = torch.randn(M, 1, 3, H, D, device=dev, dtype=dtype).unbind(2)
    k_cache = torch.randn(M, H, S_max, D, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    workspace = AD.decode_workspace(M, H, D, S_max, dev)
    pos = torch.tensor([S_max - 1], dtype=torch.int32, device=dev)
    row_start = torch.zeros(M, dtype=torch.int32, device=dev)
    return AD.decode_attention(q, k, v, k_cache, v_cache, pos, row_start, workspace, combine=False)


def measure(model, op, N, K, epilogue, M, copy_gbs, quick, dtype=torch.float16, dry_run=False) -> dict:
    """One row: the bare and fused op of shape (N, K) at M rows, cuBLAS vs Triton (see the module doc)."""
    import fastgpt.kernels.linear as KL
    import fastgpt.kernels.linear_plan as LP

    dev = torch.device("cpu" if dry_run else "cuda")
    if dry_run:
        dtype, quick, w_bytes, n_copies, n_calls = torch.float32, True, N * K * 4, 1, 1
    else:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20) or 50 * 2**20
        w_bytes = N * K * dtype.itemsize
        n_copies = max(2, math.ceil(3 * l2 / w_bytes))
        n_calls = max(REPS_MIN, n_copies)
    g = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K**-0.5 for _ in range(n_copies)]
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
    stages = set(epilogue.split("+"))
    assert stages <= {"ln", "rms", "bias", "gelu", "silu_glu", "residual"}, epilogue
    activation = "gelu_tanh" if "gelu" in stages else "silu_glu" if "silu_glu" in stages else None
    N_out = KL.output_width(N, activation)
    bias = torch.randn(N, device=dev, dtype=dtype, generator=g) * 0.1 if "bias" in stages else None
    residual = torch.randn(M, N_out, device=dev, dtype=dtype, generator=g) if "residual" in stages else None
    ln_weight = torch.ones(K, device=dev, dtype=dtype)
    if "ln" in stages:
        ln = dict(ln_weight=ln_weight, ln_bias=torch.zeros(K, device=dev, dtype=dtype))
    elif "rms" in stages:
        ln = dict(ln_weight=ln_weight, norm="rmsnorm", ln_eps=1e-5)
    else:
        ln = {}
    fused_kwargs = dict(activation=activation, residual=residual, **ln)
    out_gemv = torch.empty(M, N, device=dev, dtype=dtype)  # the bare product: N columns
    out = torch.empty(M, N_out, device=dev, dtype=dtype)  # the fused op: N/2 with silu_glu
    bias_or_zero = bias if bias is not None else torch.zeros(N, device=dev, dtype=dtype)

    if quick:
        config = KL.default_config(M, N, K, dev)
        chosen = None
    else:
        chosen = LP.plan(x, weights[0], bias, **fused_kwargs)
        config = chosen.config or KL.default_config(M, N, K, dev)
    gemv_config = KL.default_config(M, N, K, dev) if quick else LP.plan(x, weights[0], bias_or_zero).config
    gemv_config = gemv_config or KL.default_config(M, N, K, dev)

    times = {
        "cublas_gemv_us": _graph_us(lambda i: torch.addmm(bias_or_zero, x, weights[i % n_copies].t(), out=out_gemv), n_calls),
        "triton_gemv_us": _graph_us(
            lambda i: KL.linear(x, weights[i % n_copies], bias_or_zero, out=out_gemv, config=gemv_config), n_calls
        ),
        "cublas_fused_us": _graph_us(
            lambda i: KL.cublas_linear(x, weights[i % n_copies], bias, out=out, **fused_kwargs), n_calls
        ),
        "triton_fused_us": _graph_us(
            lambda i: KL.linear(x, weights[i % n_copies], bias, out=out, config=config, **fused_kwargs), n_calls
        ),
        "triton_fused_nopdl_us": _graph_us(
            lambda i: KL.linear(x, weights[i % n_copies], bias, out=out, config=config, **fused_kwargs), n_calls, pdl=False
        ),
    }
    if op == "attn_proj" and M <= KL.GEMV_MAX_M:
        partials = _attention_partials(M, K, dev, dtype)
        out3 = out.view(M, 1, N)  # (M, N) -> (B, 1, N): the attention output's leading shape
        res3 = residual.view(M, 1, N)  # (attn_proj has no activation: N_out = N)
        combine_config = KL.default_config(M, N, K, dev)

        def with_combine(i):
            KL.linear(None, weights[i % n_copies], bias, residual=res3, out=out3, config=combine_config, attn_partials=partials)

        times["triton_combine_us"] = _graph_us(with_combine, n_calls)
        times["triton_combine_nopdl_us"] = _graph_us(with_combine, n_calls, pdl=False)
    gb = w_bytes / 1e9
    row = dict(model=model, op=op, N=N, K=K, M=M, dtype=str(dtype).replace("torch.", ""), epilogue=epilogue, weight_mb=round(w_bytes / 2**20, 2))
    row.update({k: round(v, 2) for k, v in times.items()})
    for side in (k[: -len("_us")] for k in times):
        gbs = gb / (times[f"{side}_us"] * 1e-6)
        row[f"{side}_gbs"] = round(gbs, 1)
        row[f"{side}_bw_frac"] = round(gbs / copy_gbs, 3)
    row["fused_speedup_vs_cublas"] = round(times["cublas_fused_us"] / times["triton_fused_us"], 3)
    row["triton_config"] = str(config)
    row["plan"] = None if chosen is None else chosen.impl
    row["plan_reason"] = None if chosen is None else chosen.reason
    row["pdl_speedup"] = round(times["triton_fused_nopdl_us"] / times["triton_fused_us"], 3)
    if dry_run:  # the interpreter's results against the cuBLAS path (torch on the CPU)
        got = KL.linear(x, weights[0], bias, config=config, **fused_kwargs)
        ref = KL.cublas_linear(x, weights[0], bias, **fused_kwargs)
        row["max_rel_err_vs_cublas"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    del weights
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="layer shapes only, default configs (< 40 s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter on the CPU (CI)")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if not torch.cuda.is_available():
        print("benchmarks.linear needs a CUDA GPU (cuBLAS vs the Triton GEMV); nothing to measure here.")
        return 0
    if not args.quick:
        os.environ.setdefault("FASTGPT_LINEAR", "tune")  # plan(): every tile at two splits
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_gbs = measure_copy_bandwidth_gbs()
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    header = (
        f"{'model':<13}{'op':<10}{'N x K':>13}{'M':>3} | {'cuBLAS':>8}{'Triton':>8}{'bw%':>6} (bare GEMV, us)"
        f" | {'cuBLAS':>8}{'Triton':>8}{'x':>6} (fused op, us) | plan"
    )
    print(header)
    for model, op, N, K, epilogue, dtype in shapes(include_lm_head=not args.quick):
        # --quick (the GPU check's stage, 45 s): the Llama rows at M = 1 only (each new
        # dtype / epilogue is a few Triton compiles).
        for M in (1,) if args.quick and model.startswith("llama") else (1, 8):
            r = measure(model, op, N, K, epilogue, M, copy_gbs, args.quick, dtype=dtype)
            rows.append(r)
            print(
                f"{model:<13}{op:<10}{f'{N}x{K}':>13}{M:>3} | {r['cublas_gemv_us']:>8.2f}{r['triton_gemv_us']:>8.2f}"
                f"{100 * r['triton_gemv_bw_frac']:>5.0f}% | {r['cublas_fused_us']:>8.2f}{r['triton_fused_us']:>8.2f}"
                f"{r['fused_speedup_vs_cublas']:>6.2f} | PDL x{r['pdl_speedup']:.2f}"
                + (f" | +combine {r['triton_combine_us']:.2f}" if "triton_combine_us" in r else "")
                + f" | {r['plan'] or '-'}",
                flush=True,
            )

    summary = []
    for r in rows:
        if r["model"] == "gpt2" and r["M"] == 1 and r["op"] != "lm_head":
            summary.append(
                dict(
                    metric=f"GEMV bw / copy bw, gpt2 {r['op']} {r['N']}x{r['K']} M=1",
                    value=r["triton_gemv_bw_frac"],
                    target=">= 0.70",
                    met=r["triton_gemv_bw_frac"] >= 0.70,
                )
            )
    xl_fc = next(r for r in rows if r["model"] == "gpt2-xl" and r["op"] == "fc" and r["M"] == 1)
    summary.append(
        dict(metric="GEMV bw / copy bw, gpt2-xl fc 6400x1600 M=1", value=xl_fc["triton_gemv_bw_frac"], target=">= 0.80", met=xl_fc["triton_gemv_bw_frac"] >= 0.80)
    )
    llama = [r for r in rows if r["model"] == "llama-3.2-1b" and r["M"] == 1 and r["op"] != "lm_head"]
    if llama:  # one layer's four ops, each at the plan's choice (the faster of cuBLAS and Triton)
        layer_us = sum(min(r["triton_fused_us"], r["cublas_fused_us"]) for r in llama)
        layer_frac = sum(r["weight_mb"] * 2**20 for r in llama) / (layer_us * 1e-6) / 1e9 / copy_gbs
        summary.append(
            dict(
                metric="llama-3.2-1b layer GEMVs (fused, plan) bw / copy bw, M=1",
                value=round(layer_frac, 3),
                target=">= 0.75",
                met=layer_frac >= 0.75,
            )
        )
    slower = [f"{r['model']}.{r['op']}.M{r['M']}" for r in rows if r["fused_speedup_vs_cublas"] < 1.0]
    summary.append(
        dict(
            metric="fused GEMV not slower than cuBLAS path (shapes slower)",
            value=", ".join(slower) if slower else "none",
            target="none (else plan() picks cuBLAS)",
            met=not slower,
        )
    )
    write_results("linear", dict(result_header(), copy_bandwidth_gbs=round(copy_gbs, 1), quick=args.quick, rows=rows, summary=summary))
    print()
    for s in summary:
        value = f"{s['value']:.3f}" if isinstance(s["value"], float) else s["value"]
        print(f"{s['metric']:<58}{value:>10}  target {s['target']:<12} {'MET' if s['met'] else 'missed'}")
    return 0


def dry_run() -> int:
    """Every column on tiny shapes under the Triton interpreter (CPU); fails when a result is off."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before the kernels are imported: rerun in a child.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        return subprocess.call([sys.executable, "-m", "benchmarks.linear", "--dry-run"], env=env)
    worst = 0.0
    for model, op, N, K, epilogue, _ in shapes(include_lm_head=True, dry_run=True):
        for M in (1, 2):
            r = measure(model, op, N, K, epilogue, M, copy_gbs=1.0, quick=True, dry_run=True)
            worst = max(worst, r["max_rel_err_vs_cublas"])
            print(f"{model:<10} {op:<10}{N:>5}x{K:<5} M={M}  columns: {sorted(k for k in r if k.endswith('_us'))}  err {r['max_rel_err_vs_cublas']:.1e}")
    ok = worst < 1e-4
    print(f"dry run: worst relative error vs the cuBLAS path {worst:.1e} ({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
