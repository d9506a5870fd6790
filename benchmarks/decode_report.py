"""The decode benchmark's reports: the table printed at the end of a run, and the summary of the
issues' targets stored in the JSON's ``summary``: GPT-2 (H100, fp16, 128-token prompt, 256 new
tokens), and issue 15's LLaMA family -- Llama-3.2-1B at batch 1 (bf16, same prompt and length)
at >= 75 % of the roofline on a GPU, and on a CPU fastgpt not slower than HF eager on the small
Llama- and Qwen-shaped models (batch 1, 16-token prompt, 64 new tokens).

Field meanings are in ``benchmarks/decode.py``'s docstring and the README's Benchmark section.
``python -m benchmarks.decode_report RESULTS.json`` prints a results file's rows as Markdown.
"""

from __future__ import annotations


def _match_text(r: dict) -> tuple[str, bool | None]:
    if "greedy_match" not in r:
        return "not compared", None
    if r["greedy_match"]:
        return "identical", True
    if r.get("divergence_near_tie"):
        return f"near-tie after {r['match_prefix_min']} tokens", True
    return f"MISMATCH after {r['match_prefix_min']} tokens (gap {r.get('divergence_gap', float('nan')):.3g})", False


def target_summary(rows: list[dict]) -> list[dict]:
    """The issue's targets (H100, fp16, 128-token prompt, 256 new tokens, warm) for the rows present."""

    def find(engine, model, batch, prompt_len=128, new_tokens=256):
        for r in rows:
            if "error" in r:
                continue
            key = (r["engine"], r["model"], r["batch"], r["prompt_len"], r["new_tokens"])
            if key == (engine, model, batch, prompt_len, new_tokens):
                return r
        return None

    out = []

    def add(metric: str, value, target: str, met: bool | None) -> None:
        out.append(dict(metric=metric, value=value, target=target, met=met))

    if (r := find("fastgpt", "gpt2", 1)) is not None:
        add("decode gpt2 b1 tokens/s", r["tokens_per_s"], ">= 5000", r["tokens_per_s"] >= 5000)
        if r.get("roofline_frac") is not None:
            add("decode gpt2 b1 roofline", r["roofline_frac"], "> 0.40", r["roofline_frac"] > 0.4)
        for base, goal in (("hf_eager", 70), ("hf_static", 15)):
            if f"speedup_vs_{base}" in r:
                value = r[f"speedup_vs_{base}"]
                add(f"decode gpt2 b1 speed-up vs {base}", value, f">= {goal}x", value >= goal)
        text, ok = _match_text(r)
        add("decode gpt2 b1 greedy vs HF eager", text, "identical or near-tie", ok)
        if r.get("graph") and r["graph"].get("warm"):
            path = str(r["graph"]["warm"]["path"])
            add("decode gpt2 b1 warm decode path", path, "graph", path == "graph")
        if r.get("peak_mem_mb") is not None:
            add("decode gpt2 b1 peak memory MB (weights+KV+workspace)", r["peak_mem_mb"], "report", None)
    if (r := find("fastgpt", "gpt2-xl", 1)) is not None and r.get("roofline_frac") is not None:
        add("decode gpt2-xl b1 roofline", r["roofline_frac"], ">= 0.80", r["roofline_frac"] >= 0.8)
        text, ok = _match_text(r)
        add("decode gpt2-xl b1 greedy vs HF eager", text, "identical or near-tie", ok)
    if (r := find("fastgpt", "gpt2", 64)) is not None and "speedup_vs_hf_eager" in r:
        value = r["speedup_vs_hf_eager"]
        add("decode gpt2 b64 speed-up vs hf_eager", value, ">= 10x", value >= 10)
    # Issue 15: Llama-3.2-1B at batch 1 (GPU, bf16), >= 75 % of the roofline (about 1,300 tok/s on an H200).
    if (r := find("fastgpt", "llama-3.2-1b", 1)) is not None:
        if r.get("roofline_frac") is not None:
            add("decode llama-3.2-1b b1 roofline", r["roofline_frac"], ">= 0.75", r["roofline_frac"] >= 0.75)
        add("decode llama-3.2-1b b1 tokens/s", r["tokens_per_s"], "report (H200: ~1300)", None)
        if r.get("launches_per_token") is not None:
            add("decode llama-3.2-1b b1 launches/token", r["launches_per_token"], "<= 84 (5/layer + 4)",
                r["launches_per_token"] <= 84)  # fmt: skip
        for base in ("hf_eager", "hf_static"):
            if f"speedup_vs_{base}" in r:
                add(f"decode llama-3.2-1b b1 speed-up vs {base}", r[f"speedup_vs_{base}"], "report", None)
        text, ok = _match_text(r)
        add("decode llama-3.2-1b b1 greedy vs HF eager", text, "identical or near-tie", ok)
    # Issue 15 on a CPU: not slower than HF eager on the small LLaMA-family shapes, same run.
    for model in ("small-llama", "small-qwen"):
        if (r := find("fastgpt", model, 1, 16, 64)) is not None:
            if "speedup_vs_hf_eager" in r:
                value = r["speedup_vs_hf_eager"]
                add(f"decode {model} b1 speed-up vs hf_eager", value, ">= 1x (not slower)", value >= 1.0)
            text, ok = _match_text(r)
            add(f"decode {model} b1 greedy vs HF eager", text, "identical or near-tie", ok)
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"


#: The table's columns: (header, width, cell of a row); a negative width aligns left.
COLUMNS = [
    ("engine", -15, lambda r: r["engine"]),
    ("model", -11, lambda r: r["model"]),
    ("B", 3, lambda r: str(r["batch"])),
    ("prompt", 7, lambda r: str(r["prompt_len"])),
    ("new", 5, lambda r: str(r["new_tokens"])),
    ("tok/s", 10, lambda r: ("~" if r.get("noisy") else "") + f"{r['tokens_per_s']:.1f}"),
    ("spread", 8, lambda r: _pct(r.get("spread_pct"))),
    ("ms/step", 9, lambda r: f"{r['ms_per_token']:.2f}"),
    # The performance model's step (benchmarks/perf_model.py): bytes / bandwidth + launches x cost.
    ("model ms", 9, lambda r: "-" if r.get("predicted_ms_per_token") is None else f"{r['predicted_ms_per_token']:.2f}"),
    ("roofline", 9, lambda r: "-" if r.get("roofline_frac") is None else f"{100 * r['roofline_frac']:.1f}%"),
    ("x eager", 8, lambda r: f"{r['speedup_vs_hf_eager']:.2f}" if "speedup_vs_hf_eager" in r else "-"),
    ("x static", 9, lambda r: f"{r['speedup_vs_hf_static']:.2f}" if "speedup_vs_hf_static" in r else "-"),
    ("peak MB", 8, lambda r: "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"),
    ("  greedy vs HF eager", -2, lambda r: "  " + _match_text(r)[0]),
]
#: The columns that identify a row (shown for a row that failed, with its error).
KEY_COLUMNS = 5


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return [cell(r) for _, _, cell in COLUMNS[:KEY_COLUMNS]] + [f"  error: {r['error'][:90]}"]
    return [cell(r) for _, _, cell in COLUMNS]


def _aligned(cells: list[str]) -> str:
    return "".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, COLUMNS)).rstrip()


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (the README's reference tables)."""
    lines = ["| " + " | ".join(h.strip() for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        cells = [c.strip() for c in _cells(r)]
        lines.append("| " + " | ".join(cells + [""] * (len(COLUMNS) - len(cells))) + " |")
    return "\n".join(lines)


def print_table(result: dict) -> None:
    bw = result["copy_bandwidth_gbs"]
    launch = result.get("launch_overhead_us")
    print(f"\n{result['device']}  commit {result['commit']}  copy bandwidth {f'{bw:.1f}' if bw else '-'} GB/s  "
          f"launch in a graph {f'{launch:.2f} us' if launch is not None else '-'}  "
          f"median of {result.get('repeats', '?')} warm calls per row")  # fmt: skip
    header = _aligned([h for h, _, _ in COLUMNS])
    print(header + "\n" + "-" * len(header))
    for r in result["rows"]:
        print(_aligned(_cells(r)))
    if any(r.get("noisy") for r in result["rows"]):
        print("~ : this engine's call times overlap another engine's in the same configuration: the run does not "
              "rank them (a busy machine, or engines that are equally fast)")  # fmt: skip
    said = set()
    for r in result["rows"]:
        graph = r.get("graph")
        if graph and graph["first_call"] and graph["first_call"].get("captured"):
            print(
                f"  {r['engine']} {r['model']} b{r['batch']} p{r['prompt_len']} n{r['new_tokens']}: first call "
                f"{r['first_call_s']:.2f} s including CUDA-graph capture {r['capture_s']:.3f} s (warm numbers above)"
            )
        elif graph and graph["warm"] and graph["warm"]["path"] != "graph" and r["backend"] != "torch":
            line = f"  {r['engine']} {r['model']}: eager decode ({graph['warm']['reason']})"
            if line not in said:
                said.add(line)
                print(line)
    if result.get("summary"):
        print("\ntargets:")
        for s in result["summary"]:
            value = f"{s['value']:.3g}" if isinstance(s["value"], float) else str(s["value"])
            met = {True: "MET", False: "missed", None: "-"}[s["met"]]
            print(f"  {s['metric']:<58}{value:>28}  target {s['target']:<22}{met}")


def main(argv=None) -> None:
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.decode_report RESULTS.json  (prints the rows as Markdown)")
    print(markdown_table(json.loads(open(argv[0]).read())))


if __name__ == "__main__":
    main()
