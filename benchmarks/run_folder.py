"""Where a benchmark run's files go, so that a user's run never overwrites the committed results.

* ``--reference``: ``benchmarks/results/<name>_<device>.*`` -- the committed reference results
  of that device (``cpu``, ``h100``, ...), written on purpose only.
* else ``$RESULTS_DIR`` when it names a folder of your own (``make gpu-check`` sets one per stage);
* else a new run folder ``benchmarks/results/runs/<UTC time>/``, which git ignores. (The
  Makefile's default ``RESULTS_DIR=benchmarks/results`` counts as unset: it is the reference
  folder.)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path

from benchmarks.common import REPO_ROOT

#: The committed reference results.
REFERENCE_DIR = REPO_ROOT / "benchmarks" / "results"


def device_tag(device_name: str) -> str:
    """A short file-name tag for a device name from ``result_header``: ``cpu``, ``h100``, ..."""
    if device_name.startswith("cpu"):
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", device_name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def output_dir(reference: bool) -> Path:
    """The folder for this run's files (see the module docstring); created."""
    chosen = os.environ.get("RESULTS_DIR")
    if reference:
        path = REFERENCE_DIR
    elif chosen and Path(chosen).resolve() != REFERENCE_DIR.resolve():
        path = Path(chosen)
    else:
        path = REFERENCE_DIR / "runs" / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(folder: Path, name: str, result: dict) -> Path:
    """Write ``result`` as ``<folder>/<name>_<device>.json`` (again and again as rows come in)."""
    path = folder / f"{name}_{device_tag(result['device'])}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def write_run(name: str, result: dict, *, reference: bool = False) -> Path:
    """Write ``result`` as ``<name>_<device>.json`` into :func:`output_dir`; returns the path."""
    path = write_json(output_dir(reference), name, result)
    print(f"wrote {path}")
    return path
