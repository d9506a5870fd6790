"""fastgpt::topk (the CUDA extension) against torch.topk: median latency and speed-up.

    python -m benchmarks.topk [--quick]

Configurations: fp32 and fp16 logits (randn * 3), batch {1, 8, 64, 256} x vocab {50257, 128256}
at k = 50, plus k = 1 and k = 256 at batch 1. Each op is timed two ways:

* eager: ``benchmarks.common.time_gpu`` around one call (CUDA events, L2 flushed before each call;
  includes launch overhead whenever the GPU waits for the host, as in an eager decode loop);
* graph: 20 calls captured in one CUDA graph, replayed (L2 flushed before each replay); time per
  call (GPU time, what a graph-captured decode step pays).

Summary targets (the issue's): batch 1, vocab 50257, k 50: >= 5x faster than torch.topk;
batch 64: >= 2x. Results go to ``$RESULTS_DIR/topk.json``. Without a GPU it prints that and exits 0;
``--cpu`` instead runs a tiny CPU configuration of the same code (the C++ CPU op vs torch.topk,
wall-clock medians, no graphs) into ``topk-cpu.json``, as a smoke test of this script.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import result_header, time_gpu, write_results

GRAPH_CALLS = 20  # calls per captured graph


def _configs(cpu: bool):
    if cpu:  # smoke test: the rows the summary needs, nothing more
        for batch in (1, 64):
            yield torch.float32, batch, 50257, 50
        yield torch.float16, 1, 50257, 50
        yield torch.float16, 64, 50257, 50
        return
    for dtype in (torch.float32, torch.float16):
        for batch in (1, 8, 64, 256):
            for vocab in (50257, 128256):
                for k in (50, 1, 256) if batch == 1 else (50,):
                    yield dtype, batch, vocab, k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing iterations (< 1 minute)")
    parser.add_argument("--cpu", action="store_true", help="without a GPU: a tiny CPU smoke run of this script")
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    if cpu and not args.cpu:
        print("benchmarks.topk needs a CUDA GPU; nothing to measure on this machine (--cpu: a tiny CPU smoke run).")
        return 0
    device = "cpu" if cpu else "cuda"

    from fastgpt.kernels import topk as topk_mod

    backend = topk_mod.topk_backend(device)
    print(f"fastgpt topk backend on {device}: {backend}")
    ours_op = torch.ops.fastgpt.topk if backend.endswith("-ext") else None
    warmup, iters, replays = (5, 30, 10) if args.quick or cpu else (20, 200, 50)

    def eager_us(fn):
        return time_gpu(fn, warmup=warmup, iters=iters)

    def graph_us(fn):
        us = time_gpu(lambda: [fn() for _ in range(GRAPH_CALLS)], warmup=2, iters=replays, graph=True)
        return None if us is None else us / GRAPH_CALLS

    rows = []
    header = (
        f"{'dtype':8s} {'batch':>5s} {'vocab':>7s} {'k':>4s} | {'torch us':>9s} {'ours us':>8s} {'x':>6s} | "
        f"{'torch graph':>11s} {'ours graph':>10s} {'x':>6s}"
    )
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for dtype, batch, vocab, k in _configs(cpu):
        x = (torch.randn(batch, vocab, device=device) * 3).to(dtype)
        torch_us = eager_us(lambda: torch.topk(x, k))
        torch_graph_us = graph_us(lambda: torch.topk(x, k))
        row = {
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "vocab": vocab,
            "k": k,
            "torch_topk_us": torch_us,
            "torch_topk_graph_us": torch_graph_us,
            "fastgpt_us": None,
            "fastgpt_graph_us": None,
            "speedup": None,
            "speedup_graph": None,
            "values_match": None,
        }
        if ours_op is not None:
            values, _ = ours_op(x, k)
            # torch.topk breaks ties arbitrarily, so compare the sorted values only.
            row["values_match"] = bool(torch.equal(values, torch.topk(x, k).values))
            row["fastgpt_us"] = eager_us(lambda: ours_op(x, k))
            row["fastgpt_graph_us"] = graph_us(lambda: ours_op(x, k))
            row["speedup"] = torch_us / row["fastgpt_us"]
            if torch_graph_us and row["fastgpt_graph_us"]:
                row["speedup_graph"] = torch_graph_us / row["fastgpt_graph_us"]
        rows.append(row)

        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"

        print(
            f"{row['dtype']:8s} {batch:5d} {vocab:7d} {k:4d} | {torch_us:9.1f} {fmt(row['fastgpt_us'], '8.1f'):>8s} "
            f"{fmt(row['speedup'], '6.2f'):>6s} | {fmt(torch_graph_us, '11.1f'):>11s} "
            f"{fmt(row['fastgpt_graph_us'], '10.1f'):>10s} {fmt(row['speedup_graph'], '6.2f'):>6s}"
            + ("" if row["values_match"] in (None, True) else "  VALUES DIFFER")
        )

    def find(dtype, batch, vocab=50257, k=50):
        return next(r for r in rows if (r["dtype"], r["batch"], r["vocab"], r["k"]) == (dtype, batch, vocab, k))

    summary = []
    for batch, target in ((1, 5.0), (64, 2.0)):
        for dtype in ("float32", "float16"):
            r = find(dtype, batch)
            for key, how in (("speedup", "eager"), ("speedup_graph", "CUDA graph")):
                value = r[key]
                summary.append(
                    {
                        "metric": f"topk speed-up vs torch.topk, batch {batch}, vocab 50257, k 50, {dtype}, {how}",
                        "value": round(value, 2) if value is not None else "n/a",
                        "target": f">= {target:g}x",
                        "met": (value >= target) if value is not None else False,
                    }
                )
    summary.append(
        {
            "metric": "topk values equal torch.topk's in every configuration",
            "value": str(all(r["values_match"] for r in rows)),
            "target": "True",
            "met": all(r["values_match"] is True for r in rows),
        }
    )
    print()
    for s in summary:
        print(f"{s['metric']}: {s['value']} (target {s['target']}, met: {s['met']})")
    payload = {**result_header(device), "backend": backend, "quick": args.quick, "rows": rows, "summary": summary}
    write_results("topk-cpu" if cpu else "topk", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
