"""Benchmark: fastgpt's fused Triton sampler vs PyTorch and Hugging Face sampling.

``python -m benchmarks.sampling [--quick]``. For each (op, batch, vocab) it times

* ``fastgpt``: :func:`kernels.sampling.sample` (2 launches, preallocated workspace and ``out``);
* ``torch``: the plain PyTorch way -- ``top_p``: sort + softmax + cumsum + mask + multinomial;
  ``top_k``: topk + softmax + multinomial; ``step`` (temperature + top-k + top-p + draw): topk
  threshold + sort-based nucleus + softmax + multinomial;
* ``hf``: ``transformers`` ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` /
  ``TopPLogitsWarper``, then softmax + multinomial;

as the median microseconds per call, eagerly (CUDA events around each call: launch overhead
included) and inside a CUDA graph of many calls (graph time / calls: launch overhead removed).
Logits are float32 ``randn * 4`` ("lm": a peaked, LM-like distribution whose 0.9-nucleus holds tens
to hundreds of tokens); ``top_p`` is also run on ``randn * 1`` ("flat": the nucleus holds ~60% of
the vocabulary, which forces the sampler's exact fallback), to show that cost honestly. The
``fallback_rows`` column is the fraction of rows that needed the fallback (``path_bits`` in the
JSON: the union of the rows' ``kernels.sampling.PATH_*`` bits).

Summary targets: the whole step (T=0.8, top_k=50, top_p=0.9) at batch 1, vocab 50257 under 20 us,
and >= 10x faster than the faster of the PyTorch / HF paths at every batch size.
"""

from __future__ import annotations

import argparse
import functools
import operator
import sys

import torch

from benchmarks.common import result_header, time_gpu, write_results

TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.9


def _torch_top_p(logits, temperature, top_p):
    x = logits / temperature
    sorted_x, idx = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    sorted_x = sorted_x.masked_fill(before >= top_p, float("-inf"))
    x = torch.empty_like(x).scatter_(-1, idx, sorted_x)
    return torch.multinomial(torch.softmax(x, dim=-1), 1)


def _torch_top_k(logits, temperature, k):
    values, idx = torch.topk(logits / temperature, k, dim=-1)
    return idx.gather(-1, torch.multinomial(torch.softmax(values, dim=-1), 1))


def _torch_step(logits, temperature, k, top_p):
    x = logits / temperature
    kth = torch.topk(x, k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    return _torch_top_p(x, 1.0, top_p)


def _hf_processors(temperature=None, top_k=None, top_p=None):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if temperature is not None:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(TopPLogitsWarper(top_p))

    def run(logits, input_ids):
        return torch.multinomial(torch.softmax(procs(input_ids, logits), dim=-1), 1)

    return run


def _time(fn, iters: int) -> tuple[float, float | None]:
    """(eager, graph) microseconds per call, L2 flushed (graph: None when fn cannot be captured)."""
    eager_us = time_gpu(fn, warmup=5, iters=iters)
    calls = 100 if eager_us < 500 else 10
    graph_us = time_gpu(lambda: [fn() for _ in range(calls)], warmup=2, iters=5, graph=True)
    return eager_us, None if graph_us is None else graph_us / calls


def _settings(op: str, B: int, device):
    from fastgpt.kernels.sampling import check_sampling_settings

    T, k, p = {"top_p": (1.0, 0, TOP_P), "top_k": (1.0, TOP_K, 1.0), "step": (TEMPERATURE, TOP_K, TOP_P)}[op]
    check_sampling_settings(T, k, p, 0.0)  # host-side validation, as generate() does
    return (
        torch.full((B,), T, dtype=torch.float32, device=device),
        torch.full((B,), k, dtype=torch.int32, device=device),
        torch.full((B,), p, dtype=torch.float32, device=device),
        torch.zeros(B, dtype=torch.float32, device=device),
    ), (T, k, p)


def bench_one(op: str, dist: str, B: int, V: int, iters: int) -> dict:
    from fastgpt.kernels import sampling as S

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(B * 7 + V)
    scale = 4.0 if dist == "lm" else 1.0
    logits = torch.randn(B, V, device=dev, generator=g) * scale
    settings, (T, k, p) = _settings(op, B, dev)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    ws = S.sampling_workspace(B, V, dev)
    out = torch.empty(B, dtype=torch.int64, device=dev)

    def fast():
        S.sample(logits, *settings, seed, step, out=out, workspace=ws)

    # The decode step's call: the same draw plus the EOS ban, EOS -> pad and the step's counters
    # (what generate's sampler does in the same two launches).
    book = dict(
        eos=torch.tensor([V - 1, V - 2], dtype=torch.int64, device=dev),
        pad=torch.zeros(1, dtype=torch.int64, device=dev),
        finished=torch.zeros(B, dtype=torch.bool, device=dev),
        n_generated=torch.zeros(1, dtype=torch.int64, device=dev),
        min_new_tokens=torch.ones(1, dtype=torch.int64, device=dev),
        cache_pos=torch.zeros(1, dtype=torch.int32, device=dev),
    )

    def fast_step():
        S.sample(logits, *settings, seed, step, out=out, workspace=ws, check_values=False, **book)

    fast()
    torch.cuda.synchronize()
    fallback = float(((ws["path"][:B] & S.PATH_FALLBACK) != 0).float().mean())
    path_bits = functools.reduce(operator.or_, ws["path"][:B].tolist(), 0)  # kernels.sampling.PATH_* bits

    if op == "top_p":
        torch_fn = lambda: _torch_top_p(logits, T, p)  # noqa: E731
        hf = _hf_processors(top_p=p)
    elif op == "top_k":
        torch_fn = lambda: _torch_top_k(logits, T, k)  # noqa: E731
        hf = _hf_processors(top_k=k)
    else:
        torch_fn = lambda: _torch_step(logits, T, k, p)  # noqa: E731
        hf = _hf_processors(temperature=T, top_k=k, top_p=p)
    input_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
    hf_fn = lambda: hf(logits, input_ids)  # noqa: E731

    row = {"op": op, "dist": dist, "batch": B, "vocab": V, "fallback_rows": fallback, "path_bits": path_bits}
    for name, fn in (("fastgpt", fast), ("fastgpt_step", fast_step), ("torch", torch_fn), ("hf", hf_fn)):
        eager, graph = _time(fn, iters)
        row[f"{name}_us"] = eager
        row[f"{name}_graph_us"] = graph
    for base in ("torch", "hf"):
        row[f"speedup_vs_{base}"] = row[f"{base}_us"] / row["fastgpt_us"]
        if row[f"{base}_graph_us"] is not None and row["fastgpt_graph_us"] is not None:
            row[f"speedup_vs_{base}_graph"] = row[f"{base}_graph_us"] / row["fastgpt_graph_us"]
        else:
            row[f"speedup_vs_{base}_graph"] = None
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (under a minute on an H100)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.sampling needs a CUDA GPU; nothing to measure here.")
        return 0

    batches = (1, 8, 64, 256)
    if args.quick:
        cases = [("step", "lm", B, 50257) for B in batches]
        cases += [("step", "lm", 1, 128256), ("top_p", "lm", 1, 50257), ("top_k", "lm", 1, 50257),
                  ("top_p", "flat", 1, 50257)]
        iters = 20
    else:
        cases = [(op, "lm", B, V) for op in ("step", "top_p", "top_k") for V in (50257, 128256) for B in batches]
        cases += [("top_p", "flat", B, V) for V in (50257, 128256) for B in batches]
        iters = 50

    cols = ["op", "dist", "batch", "vocab", "fallback_rows", "fastgpt_us", "fastgpt_graph_us", "fastgpt_step_us", "torch_us",
            "torch_graph_us", "hf_us", "hf_graph_us", "speedup_vs_torch", "speedup_vs_hf"]
    print("  ".join(f"{c:>14}" for c in cols))
    rows = []
    for op, dist, B, V in cases:
        row = bench_one(op, dist, B, V, iters)
        rows.append(row)
        print("  ".join(f"{_fmt(row[c]):>14}" for c in cols), flush=True)

    summary = []
    step_b1 = next(r for r in rows if r["op"] == "step" and r["batch"] == 1 and r["vocab"] == 50257)
    g = step_b1["fastgpt_graph_us"]
    summary.append({"metric": "step (T, top-k 50, top-p 0.9, draw) batch 1 vocab 50257, us per call in a CUDA graph",
                    "value": g, "target": "< 20 us", "met": None if g is None else g < 20})
    summary.append({"metric": "same, eager us per call (CUDA events, launch overhead included)",
                    "value": step_b1["fastgpt_us"], "target": "< 20 us", "met": step_b1["fastgpt_us"] < 20})
    for r in rows:
        if r["op"] != "step":
            continue
        eager = min(r["speedup_vs_torch"], r["speedup_vs_hf"])
        graphs = [v for v in (r["speedup_vs_torch_graph"], r["speedup_vs_hf_graph"]) if v is not None]
        summary.append({"metric": f"step speed-up vs the faster of torch/HF, batch {r['batch']} vocab {r['vocab']}, eager",
                        "value": eager, "target": ">= 10x", "met": eager >= 10})
        if graphs:
            summary.append({"metric": f"step speed-up vs the faster of torch/HF, batch {r['batch']} vocab {r['vocab']}, graphs",
                            "value": min(graphs), "target": ">= 10x", "met": min(graphs) >= 10})
    payload = result_header("cuda")
    payload.update({"quick": args.quick, "settings": {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P},
                    "rows": rows, "summary": summary})
    write_results("sampling", payload)
    print()
    for s in summary:
        print(f"{s['metric']}: {_fmt(s['value'])} (target {s['target']}, met={s['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
