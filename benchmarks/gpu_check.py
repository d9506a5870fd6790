"""``make gpu-check``: the one prepared command for a lent GPU machine.

Runs, each stage under its own time limit so one hang cannot eat the lease:
every CUDA test, ``compute-sanitizer`` (memcheck, racecheck) on a small top-k case, and the
benchmarks in their quick configurations, within one overall budget (``GPU_CHECK_BUDGET_S``,
default 540 s: a lent GPU gives a session 15 minutes in all). Needs no network.

Only a few files come back from the GPU machine, so the benchmarks write into a staging folder
and everything is packed into ``$RESULTS_DIR/gpu_check.json`` (stage results, test counts,
failures, and every benchmark's JSON under ``results``) plus the decode plots. Back on the
development machine, ``python -m benchmarks.gpu_check --unpack PATH/gpu_check.json`` writes each
benchmark's JSON into ``benchmarks/results/`` for committing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, result_header, results_dir, write_results

PY = sys.executable

#: (name, command, time limit in seconds), in order of value: the tests, the headline decode
#: numbers, the kernel benchmarks, then the rest. A stage gets min(its limit, budget left).
STAGES: list[tuple[str, list[str], int]] = [
    ("build-extension", [PY, "-c", "import fastgpt.kernels.topk as t; print(t.topk_backend('cuda'))"], 180),
    ("cuda-tests", [PY, "-m", "pytest", "tests", "-q", "-rfEs", "-p", "no:cacheprovider", "--maxfail=30"], 240),
    ("bench-decode", [PY, "-m", "benchmarks.decode", "--quick"], 180),
    ("bench-attention", [PY, "-m", "benchmarks.attention", "--quick"], 60),
    ("bench-sampling", [PY, "-m", "benchmarks.sampling", "--quick"], 45),
    ("bench-topk", [PY, "-m", "benchmarks.topk", "--quick"], 45),
    ("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", PY, "tests/sanitize_topk.py"], 60),
    ("racecheck", ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1", PY, "tests/sanitize_topk.py"], 90),
    ("profile", [PY, "-m", "benchmarks.profile", "--quick"], 60),
    ("bench-linear", [PY, "-m", "benchmarks.linear", "--quick"], 40),
    ("bench-beam", [PY, "-m", "benchmarks.beam", "--quick"], 45),
]


def run_stage(name: str, cmd: list[str], limit: int, stage_dir: Path) -> dict:
    if limit < 10:
        return dict(stage=name, status="skipped", reason="overall budget spent")
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
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RESULTS_DIR=str(stage_dir))
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


def collect(stage_dir: Path) -> dict[str, dict]:
    """Every benchmark JSON the stages wrote, by name; plots are copied next to gpu_check.json."""
    results = {}
    for path in sorted(stage_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            results[path.stem] = {"error": f"unreadable: {exc}"}
    for png in sorted(stage_dir.glob("*.png")):
        shutil.copy(png, results_dir() / png.name)
    return results


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """The ``summary`` entries of every benchmark JSON written in this run."""
    return [dict(file=name, **entry) for name, data in results.items() for entry in data.get("summary", [])]


def unpack(path: Path, dest: Path) -> None:
    """Write each benchmark payload packed in a gpu_check.json into ``dest/<name>.json``."""
    packed = json.loads(path.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name, payload in packed.pop("results", {}).items():
        (dest / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {dest / f'{name}.json'}")
    (dest / "gpu_check.json").write_text(json.dumps(packed, indent=2) + "\n")
    print(f"wrote {dest / 'gpu_check.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the prepared GPU check")
    parser.add_argument("--unpack", type=Path, help="split a packed gpu_check.json into benchmarks/results/")
    args = parser.parse_args(argv)
    if args.unpack:
        unpack(args.unpack, REPO_ROOT / "benchmarks" / "results")
        return 0
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "540"))
    started = time.perf_counter()
    stages = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, cmd, limit in STAGES:
            left = budget - (time.perf_counter() - started)
            stages.append(run_stage(name, cmd, int(min(limit, left)), Path(tmp)))
        results = collect(Path(tmp))
    payload = dict(result_header(), stages=stages, total_seconds=round(time.perf_counter() - started, 1), results=results)
    write_results("gpu_check", payload)

    print("\n==================== gpu-check summary ====================")
    for s in stages:
        extra = s.get("counts", "") or s.get("reason", "")
        print(f"{s['stage']:<18}{s['status']:<28}{s.get('seconds', ''):>7}  {extra}")
    for s in stages:
        for f in s.get("failures", []):
            print("  ", f)
    print()
    for r in summary_rows(results):
        value = f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"])
        met = {True: "MET", False: "missed", None: "-"}.get(r.get("met"), "-")
        print(f"{r['file']:<16}{r['metric']:<58}{value:>12}  target {r.get('target', '-'):<22}{met}")
    print(f"total {payload['total_seconds']} s")
    return 0 if all(s["status"] in ("ok", "skipped") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
