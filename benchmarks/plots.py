"""PNG plots of the decode benchmark (matplotlib; skipped with a message when it is missing).

Each plot is drawn only when the run measured what it shows, and every title says the device,
the dtype, the weights (random or real) and the fastgpt backend that ran:

* ``<prefix>_engines.png``: the engines side by side, one panel per model, one group of bars
  per batch size (at the run's most common prompt / new-token setting): median tokens/s, the
  whisker spanning the slowest to the fastest call, the speed-up over HF eager written above
  each bar; a hatched bar is ``noisy`` (its times overlap another engine's).
* ``<prefix>_tokens_per_s.png`` (a model measured at two or more batch sizes): tokens/s against
  batch size, one line per engine, and the roofline -- the tokens/s of a step that reads
  ``step_bytes`` at the copy bandwidth measured in the same run (``B / (bytes / bandwidth)``).
* ``<prefix>_ms_per_token.png`` (a model measured at two or more context lengths): ms per decode
  step against the mean context (``prompt + new_tokens / 2``) at the smallest batch, one line per
  engine (whiskers: the rounds' fastest and slowest step), with the roofline's ms per step.

``python -m benchmarks.plots results.json`` redraws them from a results file.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def _load_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _ok_rows(result: dict) -> list[dict]:
    return [r for r in result.get("rows", []) if "error" not in r and r.get("tokens_per_s")]


def _title(what: str, result: dict, rows: list[dict]) -> str:
    weights = sorted({"real" if str(r.get("weights", "random")).startswith(("real", "weights from")) else "random"
                      for r in rows})  # fmt: skip
    backends = sorted({r["backend"] for r in rows if r["engine"].startswith("fastgpt") and r.get("backend")})
    return (f"{what}\n{result.get('device', '?')} | {rows[0].get('dtype', '?')} | weights: {'+'.join(weights)} | "
            f"fastgpt backend: {'+'.join(backends) or '?'} | commit {result.get('commit', '?')}")  # fmt: skip


def _plain_log_axis(axis) -> None:
    """Log scale with plain numbers as tick labels (no ``2.4x10^0``)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _engines(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["engine"] for r in rows))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_engine_bars(plt, result: dict, rows: list[dict], path: Path) -> Path:
    models = list(dict.fromkeys(r["model"] for r in rows))
    engines = _engines(rows)
    colors = {e: plt.cm.tab10(i) for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.2 * len(models), 9.0), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        setting = Counter((r["prompt_len"], r["new_tokens"]) for r in mrows).most_common(1)[0][0]
        srows = [r for r in mrows if (r["prompt_len"], r["new_tokens"]) == setting]
        batches = sorted({r["batch"] for r in srows})
        width = 0.8 / len(engines)
        for j, engine in enumerate(engines):
            for i, batch in enumerate(batches):
                r = next((r for r in srows if r["engine"] == engine and r["batch"] == batch), None)
                if r is None:
                    continue
                x, y = i + (j - (len(engines) - 1) / 2) * width, r["tokens_per_s"]
                err = [[y - r.get("tokens_per_s_min", y)], [r.get("tokens_per_s_max", y) - y]]
                ax.bar(x, y, width, color=colors[engine], hatch="//" if r.get("noisy") else None,
                       yerr=err, capsize=3, label=engine if i == 0 else None)  # fmt: skip
                if "speedup_vs_hf_eager" in r:
                    ax.annotate(f"{r['speedup_vs_hf_eager']:.2f}x", (x, r.get("tokens_per_s_max", y)),
                                textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        values = [r["tokens_per_s"] for r in srows]
        if max(values) / min(values) > 20:  # batch 1 next to batch 64: linear bars would hide the small ones
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
        ax.set_ylabel("tokens/s (all rows; median, whisker: min..max)")
        ax.set_title(f"{model}: prompt {setting[0]}, {setting[1]} new tokens", fontsize=10)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title("decode throughput by engine (label: speed-up over HF eager; hatched: noisy)", result, rows),
                 fontsize=9)  # fmt: skip
    return _save(plt, fig, path)


def plot_tokens_vs_batch(plt, result: dict, rows: list[dict], panels: list, path: Path) -> Path:
    bw = result.get("copy_bandwidth_gbs")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.2 * len(panels), 9.0), 4.2), squeeze=False)
    for ax, (model, setting, srows) in zip(axes[0], panels):
        by_engine = defaultdict(list)
        for r in srows:
            by_engine[r["engine"]].append(r)
        for engine, erows in by_engine.items():
            erows.sort(key=lambda r: r["batch"])
            ys = [r["tokens_per_s"] for r in erows]
            err = [[y - r.get("tokens_per_s_min", y) for y, r in zip(ys, erows)],
                   [r.get("tokens_per_s_max", y) - y for y, r in zip(ys, erows)]]  # fmt: skip
            ax.errorbar([r["batch"] for r in erows], ys, yerr=err, marker="o", capsize=3, label=engine)
        if bw:
            roof = sorted({(r["batch"], r["batch"] / (r["step_bytes"] / (bw * 1e9))) for r in srows})
            ax.plot([p[0] for p in roof], [p[1] for p in roof], "k--", label=f"roofline ({bw:.0f} GB/s copy)")
        batches = sorted({r["batch"] for r in srows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        _plain_log_axis(ax.yaxis)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s (all rows)")
        ax.set_title(f"{model}: prompt {setting[0]}, {setting[1]} new tokens", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title("decode throughput against batch size", result, rows), fontsize=9)
    return _save(plt, fig, path)


def plot_ms_vs_context(plt, result: dict, rows: list[dict], panels: list, path: Path) -> Path:
    bw = result.get("copy_bandwidth_gbs")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.2 * len(panels), 9.0), 4.2), squeeze=False)
    for ax, (model, batch, brows) in zip(axes[0], panels):
        by_engine = defaultdict(dict)
        for r in brows:
            by_engine[r["engine"]][r["prompt_len"] + r["new_tokens"] / 2] = r
        for engine, points in by_engine.items():
            xs = sorted(points)
            ys = [points[x]["ms_per_token"] for x in xs]
            err = [[y - points[x].get("ms_per_token_min", y) for x, y in zip(xs, ys)],
                   [points[x].get("ms_per_token_max", y) - y for x, y in zip(xs, ys)]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=engine)
        if bw:
            roof = sorted({(r["prompt_len"] + r["new_tokens"] / 2, r["step_bytes"] / (bw * 1e9) * 1e3) for r in brows})
            ax.plot([p[0] for p in roof], [p[1] for p in roof], "k--", label=f"roofline ({bw:.0f} GB/s copy)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("mean context length (prompt + new tokens / 2)")
        ax.set_ylabel("ms per decode step (median, whisker: min..max)")
        ax.set_title(f"{model}: batch {batch}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title("decode step time against context length", result, rows), fontsize=9)
    return _save(plt, fig, path)


def plot_decode(result: dict, out_dir: Path, prefix: str = "decode") -> list[Path]:
    """Write the plots the result supports (see the module docstring); returns the paths written."""
    plt = _load_pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rows = _ok_rows(result)
    if not rows:
        print("no successful rows: no plots")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_engine_bars(plt, result, rows, out_dir / f"{prefix}_engines.png")]
    batch_panels, context_panels = [], []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        setting = Counter((r["prompt_len"], r["new_tokens"]) for r in mrows).most_common(1)[0][0]
        srows = [r for r in mrows if (r["prompt_len"], r["new_tokens"]) == setting]
        if len({r["batch"] for r in srows}) >= 2:
            batch_panels.append((model, setting, srows))
        batch = min(r["batch"] for r in mrows)
        brows = [r for r in mrows if r["batch"] == batch]
        if len({r["prompt_len"] + r["new_tokens"] / 2 for r in brows}) >= 2:
            context_panels.append((model, batch, brows))
    if batch_panels:
        written.append(plot_tokens_vs_batch(plt, result, rows, batch_panels, out_dir / f"{prefix}_tokens_per_s.png"))
    if context_panels:
        written.append(plot_ms_vs_context(plt, result, rows, context_panels, out_dir / f"{prefix}_ms_per_token.png"))
    return written


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.plots RESULTS.json")
    path = Path(argv[0])
    for written in plot_decode(json.loads(path.read_text()), path.parent, prefix=path.stem):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
