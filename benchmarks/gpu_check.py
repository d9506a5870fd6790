"""``make gpu-check``: the one prepared command for a lent GPU machine.

Runs, each stage under its own time limit so one hang cannot eat the lease:
every CUDA test, ``compute-sanitizer`` (memcheck, racecheck) on a small top-k case, and the
benchmarks in their quick configurations. Writes ``gpu_check.json`` (stage results, test counts,
failures) beside the benchmarks' own JSON in ``$RESULTS_DIR`` (at most 8 files in all), and prints
a summary table last. Needs no network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, result_header, results_dir, write_results

PY = sys.executable

#: (name, command, time limit in seconds). Order matters: tests first, then the benchmarks.
STAGES: list[tuple[str, list[str], int]] = [
    ("build-extension", [PY, "-c", "import kernels.topk as t; print(t.topk_backend('cuda'))"], 240),
    ("cuda-tests", [PY, "-m", "pytest", "tests", "-q", "-x", "-rfEs", "-p", "no:cacheprovider", "--maxfail=20"], 300),
    ("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", PY, "tests/sanitize_topk.py"], 120),
    ("racecheck", ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1", PY, "tests/sanitize_topk.py"], 180),
    ("bench-attention", [PY, "-m", "benchmarks.attention", "--quick"], 120),
    ("bench-topk", [PY, "-m", "benchmarks.topk", "--quick"], 90),
    ("bench-sampling", [PY, "-m", "benchmarks.sampling", "--quick"], 90),
    ("bench-decode", [PY, "-m", "benchmarks.decode", "--quick"], 240),
    ("profile", [PY, "-m", "benchmarks.profile", "--quick"], 90),
]


def run_stage(name: str, cmd: list[str], limit: int) -> dict:
    if cmd[0] != PY and shutil.which(cmd[0]) is None:
        return dict(stage=name, status="skipped", reason=f"{cmd[0]} not found")
    script = next((c for c in cmd if c.endswith(".py") and "/" in c), None)
    if script and not (REPO_ROOT / script).exists():
        return dict(stage=name, status="skipped", reason=f"{script} missing")
    module = cmd[cmd.index("-m") + 1] if "-m" in cmd else None
    if module and module.startswith("benchmarks.") and not (REPO_ROOT / (module.replace(".", "/") + ".py")).exists():
        return dict(stage=name, status="skipped", reason=f"{module} missing")
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {limit} s"
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    print(output[-4000:], flush=True)
    result = dict(stage=name, status=status, seconds=round(seconds, 1), output_tail=output[-3000:])
    if name == "cuda-tests":
        counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)
        result["counts"] = {kind: int(n) for n, kind in counts}
        result["failures"] = re.findall(r"^(?:FAILED|ERROR) .*$", output, flags=re.M)[:40]
    return result


def summary_rows() -> list[dict]:
    """The ``summary`` entries of every benchmark JSON written in this run."""
    rows = []
    for path in sorted(results_dir().glob("*.json")):
        if path.name == "gpu_check.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in data.get("summary", []):
            rows.append(dict(file=path.name, **entry))
    return rows


def main() -> int:
    started = time.perf_counter()
    stages = [run_stage(*stage) for stage in STAGES]
    payload = dict(result_header(), stages=stages, total_seconds=round(time.perf_counter() - started, 1))
    write_results("gpu_check", payload)

    print("\n==================== gpu-check summary ====================")
    for s in stages:
        extra = s.get("counts", "") or s.get("reason", "")
        print(f"{s['stage']:<18}{s['status']:<28}{s.get('seconds', ''):>7}  {extra}")
    for f in stages[1].get("failures", []) if len(stages) > 1 else []:
        print("  ", f)
    print()
    for r in summary_rows():
        value = f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"])
        met = {True: "MET", False: "missed", None: "-"}.get(r.get("met"), "-")
        print(f"{r['file']:<16}{r['metric']:<58}{value:>12}  target {r.get('target', '-'):<22}{met}")
    print(f"total {payload['total_seconds']} s")
    return 0 if all(s["status"] in ("ok", "skipped") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
