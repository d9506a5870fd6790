"""The results of a ``make gpu-check`` run: one JSON line per result, and what comes back.

Every stage process appends rows to ``$GPU_CHECK_JSONL`` with :func:`record` the moment it has
a result, so a run killed at any point keeps everything measured until then. :func:`read_rows`
reads the file back (a line cut by a kill is skipped and counted), :func:`assemble` groups the
rows (header, stages, smoke checks, headline, test files, benchmarks), :func:`unpack` writes a
run into ``benchmarks/results/`` named by device, and :func:`check_sendable` says whether a
folder is what a lent machine sends back (at most 8 plain-named files of at most 16 MiB, no
folder deeper than one).

Rows are dicts with ``stage``, ``kind`` and ``time`` (Unix seconds) and the result's fields.
Kinds: ``start`` / ``end`` / ``stopped`` (the run), ``stage`` (a stage's status, seconds, exit
code, output tail), ``check`` (a smoke or build check), ``headline`` (one engine's decode row),
``tests`` (one test file's counts and failures), ``benchmark`` + ``benchmark_row`` (a benchmark's
JSON file, its ``rows`` one line each), ``note``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

JSONL_NAME = "gpu_check.jsonl"
SUMMARY_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
#: What a lent machine sends back from its output folder.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: Environment variable naming the .jsonl file a stage process appends its rows to.
JSONL_ENV = "GPU_CHECK_JSONL"


def record(stage: str, kind: str, **fields) -> dict:
    """Append one result row to ``$GPU_CHECK_JSONL`` (flushed at once) and print it.

    Every stage process calls this for each result as soon as it has it. Without
    ``GPU_CHECK_JSONL`` (a stage run by hand) the row is only printed.
    """
    row = {"stage": stage, "kind": kind, "time": round(time.time(), 3), **fields}
    line = json.dumps(row, default=str, allow_nan=True)
    path = os.environ.get(JSONL_ENV)
    if path:
        # One write() of one whole line in append mode: concurrent stages never interleave lines.
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
    print(f"[{stage}] {kind}: {line[:300]}", flush=True)
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``gpu_check.jsonl``; a truncated or garbled line (a run killed mid-write) is
    skipped and counted in a final ``{"kind": "unreadable"}`` row."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        rows.append({"stage": "gpu-check", "kind": "unreadable", "lines": bad})
    return rows


def assemble(rows: list[dict]) -> dict:
    """One dict from the rows: header, stages, smoke checks, headline rows, test files, benchmarks.

    Benchmark results arrive as a ``benchmark`` row (the file's fields but its rows) and one
    ``benchmark_row`` per row; they are put back together here, also when the run was cut short.
    """
    out: dict = {"header": {}, "stages": [], "smoke": [], "headline": [], "tests": [], "benchmarks": {}, "other": []}
    for row in rows:
        kind = row.get("kind")
        if kind == "start":
            out["header"] = {k: v for k, v in row.items() if k not in ("stage", "kind")}
        elif kind == "stage":
            out["stages"].append(row)
        elif kind == "check":
            out["smoke"].append(row)
        elif kind == "headline":
            out["headline"].append(row)
        elif kind == "tests":
            out["tests"].append(row)
        elif kind == "benchmark":
            bench = out["benchmarks"].setdefault(row["name"], {"rows": []})
            bench.update({k: v for k, v in row["payload"].items() if k != "rows"})
        elif kind == "benchmark_row":
            out["benchmarks"].setdefault(row["name"], {"rows": []})["rows"].append(row["row"])
        else:
            out["other"].append(row)
    devices = [r.get("device") for r in out["smoke"] if r.get("check") == "device"]
    if devices and devices[0]:
        out["header"]["device"] = devices[0]
    return out


def unpack(source: Path, dest: Path) -> list[Path]:
    """Write a run (``gpu_check.jsonl``, possibly truncated, or ``gpu_check.json``, or a folder
    holding either) into ``dest``: the assembled run and each benchmark, named by device."""
    if source.is_dir():
        source = source / JSONL_NAME if (source / JSONL_NAME).exists() else source / SUMMARY_NAME
    run = assemble(read_rows(source)) if source.suffix == ".jsonl" else json.loads(source.read_text())
    slug = device_slug(run["header"].get("device", "unknown"))
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, bench in run["benchmarks"].items():
        base = re.sub(r"_cpu$", "", name)
        path = dest / f"{base}_{slug}.json"
        path.write_text(json.dumps(bench, indent=2, default=str) + "\n")
        written.append(path)
    path = dest / f"gpu_check_{slug}.json"
    path.write_text(json.dumps({k: v for k, v in run.items() if k != "benchmarks"}, indent=2, default=str) + "\n")
    written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written


def device_slug(device: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; ``"cpu (x86_64, 2 cores)"`` -> ``"cpu"``."""
    name = device.lower().replace("nvidia", "").strip()
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def check_sendable(out_dir: Path) -> list[str]:
    """Problems with ``out_dir`` as a lent machine's output folder (empty list: none)."""
    problems = []
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, at most {MAX_FILES} come back")
    for p in out_dir.rglob("*"):
        rel = p.relative_to(out_dir)
        if not all(PLAIN_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: not a plain name")
        if len(rel.parts) > 2:
            problems.append(f"{rel}: deeper than one subfolder")
        if p.is_symlink():
            problems.append(f"{rel}: a link")
        elif p.is_file() and p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes, over {MAX_FILE_BYTES}")
    return problems
