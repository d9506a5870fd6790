"""cuBLAS against the fused Triton GEMV on GPT-2's decode shapes.

``python -m benchmarks.linear [--quick]``. fp16, M (= batch at decode) in {1, 8}, the four layer
projections of GPT-2 small and XL (the LM heads too without ``--quick``), each with the epilogue
it has in the model (ln_1 + QKV + bias; out-proj + bias + residual; ln_2 + FC + bias + GELU;
proj + bias + residual; ln_f + LM head). Per shape:

* ``gemv``: the bare product with its bias -- ``torch.addmm`` (cuBLAS) vs the Triton GEMV
  (:func:`kernels.linear.linear`, bias only): microseconds, the weight-read bandwidth
  ``N*K*2 bytes / time`` in GB/s and as a fraction of the device-to-device copy bandwidth
  measured in the same run (``copy_bandwidth_gbs``, read + write bytes, as in benchmarks.common);
* ``fused``: the op as the model runs it -- :func:`kernels.linear.cublas_linear` (LayerNorm
  kernel + cuBLAS + torch epilogue) vs the one fused GEMV launch;
* ``plan``: what :func:`fastgpt.kernels.linear_plan.plan` measures and chooses for the shape (without
  ``--quick``, with ``FASTGPT_LINEAR=tune``: every tile at two splits; ``--quick`` uses the
  default Triton config to keep the compile count down).

Timing: ``REPS`` calls captured in one CUDA graph (the way decode runs), each call on a
different copy of the weight so that the copies together exceed twice the L2 cache: every call
reads its weight from HBM, as in a real decode step. Median of several replays / REPS.

Targets (``summary``): the bare Triton GEMV reads at >= 70% of the copy bandwidth at M = 1 on
GPT-2 small's four shapes (small matrices are launch-latency bound; read the numbers, not only
the flag) and >= 80% on GPT-2 XL's FC; the fused op is not slower than the cuBLAS path.
Without a GPU it prints that it needs one and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from benchmarks.common import measure_copy_bandwidth_gbs, result_header, time_gpu, write_results

#: (model, op, N, K, epilogue) at GPT-2 small (C = 768) and XL (C = 1600).
def shapes(include_lm_head: bool) -> list[tuple[str, str, int, int, str]]:
    out = []
    for model, C in (("gpt2", 768), ("gpt2-xl", 1600)):
        out += [
            (model, "qkv", 3 * C, C, "ln+bias"),
            (model, "attn_proj", C, C, "bias+residual"),
            (model, "fc", 4 * C, C, "ln+bias+gelu"),
            (model, "mlp_proj", C, 4 * C, "bias+residual"),
        ]
        if include_lm_head:
            out.append((model, "lm_head", 50257, C, "ln"))
    return out


REPS_MIN = 24
REPLAYS = 7


def _graph_us(fn, n_calls: int) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(n_calls), replayed from one graph."""
    us = time_gpu(lambda: [fn(i) for i in range(n_calls)], warmup=1, iters=REPLAYS, graph=True)
    if us is None:
        raise RuntimeError("the linear op could not be captured in a CUDA graph")
    return us / n_calls


def measure(model, op, N, K, epilogue, M, copy_gbs, quick, dtype=torch.float16) -> dict:
    import fastgpt.kernels.linear as KL
    import fastgpt.kernels.linear_plan as LP

    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    w_bytes = N * K * 2
    n_copies = max(2, math.ceil(3 * l2 / w_bytes))
    n_calls = max(REPS_MIN, n_copies)
    g = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K**-0.5 for _ in range(n_copies)]
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
    bias = None if epilogue == "ln" else torch.randn(N, device=dev, dtype=dtype, generator=g) * 0.1
    residual = torch.randn(M, N, device=dev, dtype=dtype, generator=g) if "residual" in epilogue else None
    ln = dict(ln_weight=torch.ones(K, device=dev, dtype=dtype), ln_bias=torch.zeros(K, device=dev, dtype=dtype)) if "ln" in epilogue else {}
    activation = "gelu_tanh" if "gelu" in epilogue else None
    fused_kwargs = dict(activation=activation, residual=residual, **ln)
    out = torch.empty(M, N, device=dev, dtype=dtype)
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
        "cublas_gemv_us": _graph_us(lambda i: torch.addmm(bias_or_zero, x, weights[i % n_copies].t(), out=out), n_calls),
        "triton_gemv_us": _graph_us(
            lambda i: KL.linear(x, weights[i % n_copies], bias_or_zero, out=out, config=gemv_config), n_calls
        ),
        "cublas_fused_us": _graph_us(
            lambda i: KL.cublas_linear(x, weights[i % n_copies], bias, out=out, **fused_kwargs), n_calls
        ),
        "triton_fused_us": _graph_us(
            lambda i: KL.linear(x, weights[i % n_copies], bias, out=out, config=config, **fused_kwargs), n_calls
        ),
    }
    gb = w_bytes / 1e9
    row = dict(model=model, op=op, N=N, K=K, M=M, dtype="float16", epilogue=epilogue, weight_mb=round(w_bytes / 2**20, 2))
    row.update({k: round(v, 2) for k, v in times.items()})
    for side in ("cublas_gemv", "triton_gemv", "cublas_fused", "triton_fused"):
        gbs = gb / (times[f"{side}_us"] * 1e-6)
        row[f"{side}_gbs"] = round(gbs, 1)
        row[f"{side}_bw_frac"] = round(gbs / copy_gbs, 3)
    row["fused_speedup_vs_cublas"] = round(times["cublas_fused_us"] / times["triton_fused_us"], 3)
    row["triton_config"] = str(config)
    row["plan"] = None if chosen is None else chosen.impl
    row["plan_reason"] = None if chosen is None else chosen.reason
    del weights
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="layer shapes only, default configs (< 40 s)")
    args = parser.parse_args(argv)
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
        f"{'model':<8}{'op':<10}{'N x K':>13}{'M':>3} | {'cuBLAS':>8}{'Triton':>8}{'bw%':>6} (bare GEMV, us)"
        f" | {'cuBLAS':>8}{'Triton':>8}{'x':>6} (fused op, us) | plan"
    )
    print(header)
    for model, op, N, K, epilogue in shapes(include_lm_head=not args.quick):
        for M in (1, 8):
            r = measure(model, op, N, K, epilogue, M, copy_gbs, args.quick)
            rows.append(r)
            print(
                f"{model:<8}{op:<10}{f'{N}x{K}':>13}{M:>3} | {r['cublas_gemv_us']:>8.2f}{r['triton_gemv_us']:>8.2f}"
                f"{100 * r['triton_gemv_bw_frac']:>5.0f}% | {r['cublas_fused_us']:>8.2f}{r['triton_fused_us']:>8.2f}"
                f"{r['fused_speedup_vs_cublas']:>6.2f} | {r['plan'] or '-'}",
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


if __name__ == "__main__":
    sys.exit(main())
