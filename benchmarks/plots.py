"""PNG plots of the decode benchmark (matplotlib; skipped with a message when it is missing).

* ``<prefix>_tokens_per_s.png``: tokens/s against batch size, one panel per model (at its most
  common prompt/new-tokens setting), one line per engine, and the roofline drawn in: the tokens/s
  a step reading ``step_bytes`` at the measured copy bandwidth would reach (``B / (bytes / bw)``).
* ``<prefix>_ms_per_token.png``: ms per decode step against context length (prompt + new tokens),
  batch 1 (or the smallest batch measured), one panel per model, one line per engine.

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


def plot_decode(result: dict, out_dir: Path, prefix: str = "decode") -> list[Path]:
    """Write the two plots for a decode-benchmark result; returns the paths written."""
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
    models = list(dict.fromkeys(r["model"] for r in rows))
    written = []
    title = f"{result.get('device', '')}  {rows[0].get('dtype', '')}"

    # ---- tokens/s vs batch, with the roofline ---------------------------------------------
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    bw = result.get("copy_bandwidth_gbs")
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        setting = Counter((r["prompt_len"], r["new_tokens"]) for r in mrows).most_common(1)[0][0]
        srows = [r for r in mrows if (r["prompt_len"], r["new_tokens"]) == setting]
        by_engine = defaultdict(list)
        for r in srows:
            by_engine[r["engine"]].append((r["batch"], r["tokens_per_s"]))
        for engine, points in by_engine.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=engine)
        if bw:
            roof = sorted({(r["batch"], r["batch"] / (r["step_bytes"] / (bw * 1e9))) for r in srows})
            ax.plot([p[0] for p in roof], [p[1] for p in roof], "k--", label=f"roofline ({bw:.0f} GB/s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s (all rows)")
        ax.set_title(f"{model}: prompt {setting[0]}, {setting[1]} new tokens", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode throughput  {title}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{prefix}_tokens_per_s.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # ---- ms/token vs context length ------------------------------------------------------------
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        batch = min(r["batch"] for r in mrows)
        by_engine = defaultdict(dict)
        for r in mrows:
            if r["batch"] == batch:
                by_engine[r["engine"]][r["prompt_len"] + r["new_tokens"]] = r["ms_per_token"]
        for engine, points in by_engine.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=engine)
        ax.set_yscale("log")
        ax.set_xlabel("context length (prompt + new tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{model}: batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode latency  {title}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{prefix}_ms_per_token.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
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
