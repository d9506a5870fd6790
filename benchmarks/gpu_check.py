"""``make gpu-check``: the one prepared command for a short, offline run on a lent GPU.

``RESULTS_DIR=$OUT make gpu-check`` (without make: ``PYTHONPATH=. python3 -m benchmarks.gpu_check
--results-dir $OUT``; give the call about 540 s) runs stages in order of
value within one budget (``GPU_CHECK_BUDGET_S``, default 420 s), each in its own process group,
killed whole at its limit:

1. ``build`` (in the background, beside the smoke stage: nvcc works on the CPU while the GPU is
   busy): the CUDA top-k extension; FAILS unless it built for this device.
2. ``smoke``: device facts, copy bandwidth, each kernel once against its PyTorch reference,
   graph replay against eager (``benchmarks/smoke.py``).
3. ``headline``: fastgpt vs HF eager, gpt2 b1, llama-3.2-1b b1 (bf16), gpt2-xl b1, gpt2 b64
   (``benchmarks/headline.py``).
4. ``tests:<file>``: one pytest process per test file, ``-m cuda``, most valuable files first.
5. the kernel benchmarks, the profile, the beam benchmark; the sanitizers (top-k) last.

Everything is written as it happens: every stage appends JSON lines to
``$RESULTS_DIR/gpu_check.jsonl`` (one per result, flushed; the format and its readers are in
``benchmarks/gpu_check_log.py``), so a run killed at any point still returns what it measured. At the end: ``gpu_check.json`` (the rows assembled) and a summary table.
``$RESULTS_DIR`` holds at most 8 plain-named files (``gpu_check.jsonl``, ``gpu_check.json``,
``gpu_check.log``, and a few plots), none over 16 MiB: what a lent machine sends back.

Back on the development machine::

    python -m benchmarks.gpu_check --unpack /work/.device/.../gpu_check.jsonl

writes the assembled run and each benchmark's JSON into ``benchmarks/results/``, named by device
(``gpu_check_h200.json``, ``attention_h200.json``, ...); a truncated ``.jsonl`` unpacks too.

``--dry-run`` runs the same orchestration on the CPU (Triton interpreter, tiny models and shapes,
a short budget) into a temporary folder and checks what a GPU run would send back.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_check_log import (  # noqa: F401 -- re-exported: the run's file format
    JSONL_ENV,
    JSONL_NAME,
    LOG_NAME,
    MAX_FILE_BYTES,
    MAX_FILES,
    PLAIN_NAME,
    SUMMARY_NAME,
    assemble,
    check_sendable,
    device_slug,
    read_rows,
    record,
    unpack,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: The full log stops growing here (the .jsonl keeps every result; the log is for reading).
LOG_CAP_BYTES = 8 * 2**20
TAIL_CHARS = 3000

DEFAULT_BUDGET_S = 420
DRY_RUN_BUDGET_S = 300
#: A stage given less than this is skipped, not started.
MIN_STAGE_S = 5

#: Set (to "1") in every stage process of a dry run: tiny shapes, CPU.
DRY_RUN_ENV = "GPU_CHECK_DRY_RUN"

#: Test files in order of value (fnmatch-free substrings of the file name); the rest follow in
#: name order. Files are found by glob, so a renamed file keeps its place by its name.
TEST_PRIORITY = ("cuda_graph", "attention_decode", "attention_prefill", "attention", "linear", "sampling", "topk", "generat")
#: Each test file's own cap inside the tests' share of the budget (cold Triton compiles are slow).
TEST_FILE_LIMIT_S = 60
TEST_GROUP_LIMIT_S = 150


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One step of the run: a command, its time limit, and how its results are collected."""

    name: str
    cmd: list[str]
    limit_s: float
    #: Runs beside the following stages until ``joined_before`` starts (or the run ends).
    background: bool = False
    #: Name of a background stage that must have finished before this one starts.
    after: str | None = None
    #: Part of a group sharing one limit (the test files).
    group: str | None = None
    #: Parse pytest -v output into a ``tests`` row.
    pytest_file: str | None = None
    #: Collect the JSON files the command writes into its own RESULTS_DIR as benchmark rows.
    collects_results: bool = False
    #: Called after the stage was killed at its limit (e.g. a stale build lock).
    on_kill: object = None
    env: dict = field(default_factory=dict)


def test_files(root: Path = REPO_ROOT, *, cuda_only: bool = False) -> list[str]:
    """``tests/test_*.py`` in order of value (:data:`TEST_PRIORITY`), then by name; with
    ``cuda_only``, only files that mark a test ``cuda`` (a pytest start per file costs seconds)."""
    files = sorted(Path(p).name for p in glob.glob(str(root / "tests" / "test_*.py")))
    if cuda_only:
        files = [name for name in files if "mark.cuda" in (root / "tests" / name).read_text(errors="replace")]

    def rank(name: str) -> int:
        return next((i for i, key in enumerate(TEST_PRIORITY) if key in name), len(TEST_PRIORITY))

    files.sort(key=rank)  # stable: name order inside a rank
    return [f"tests/{name}" for name in files]


def kernel_benchmarks(family: str, root: Path = REPO_ROOT) -> list[str]:
    """Benchmark modules of one kernel family: ``benchmarks/<family>.py`` and ``<family>_*.py``."""
    paths = glob.glob(str(root / "benchmarks" / f"{family}.py")) + glob.glob(str(root / "benchmarks" / f"{family}_*.py"))
    return sorted(Path(p).stem for p in paths)


def _remove_stale_build_locks() -> None:
    """torch's extension builder leaves ``<build dir>/lock`` behind when killed mid-build, and
    every later load would wait on it forever: remove those in the extension caches."""
    roots = {os.environ.get("FASTGPT_CACHE_DIR"), os.environ.get("FASTGPT_EXT_CACHE"), str(Path.home() / ".cache" / "fastgpt")}
    for root in filter(None, roots):
        for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
            try:
                os.remove(lock)
                print(f"gpu-check: removed the stale build lock {lock}", flush=True)
            except OSError:
                pass


def plan(dry_run: bool, *, max_test_files: int | None = None) -> list[Stage]:
    """The stages in order, with their limits (seconds).

    The dry run runs the same commands (the benchmarks pick their tiny CPU configurations by
    themselves without a GPU; the beam benchmark is given a tiny shape), plus, after the headline,
    a stage that is killed at its limit after writing two rows.
    """
    bench = lambda module, *extra: [PY, "-m", f"benchmarks.{module}", "--quick", *extra]  # noqa: E731
    beam_extra = ["--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"] if dry_run else []
    stages = [
        Stage("build", [PY, "-m", "benchmarks.smoke", "--build"], 240, background=True,
              on_kill=_remove_stale_build_locks),
        Stage("smoke", [PY, "-m", "benchmarks.smoke"], 90),
        Stage("headline", [PY, "-m", "benchmarks.headline"], 210),  # 4 rows: llama-3.2-1b's compiles too
    ]  # fmt: skip
    if dry_run:
        # Proves that a stage killed at its limit keeps what it wrote: two rows, then a hang.
        hang = (
            "from benchmarks.gpu_check_log import record; import time; "
            "record('killed-demo', 'check', check='first', ok=True); "
            "record('killed-demo', 'check', check='second', ok=True); time.sleep(600)"
        )
        stages.append(Stage("killed-demo", [PY, "-c", hang], 4))
    files = test_files(cuda_only=True)
    if max_test_files is not None:
        files = files[:max_test_files]
    for path in files:
        cmd = [PY, "-m", "pytest", path, "-m", "cuda", "-v", "-rfE", "-p", "no:cacheprovider", "--maxfail=25"]
        stages.append(Stage(f"tests:{Path(path).stem}", cmd, TEST_FILE_LIMIT_S, after="build",
                            group="tests", pytest_file=path))  # fmt: skip
    # Kernel benchmarks by glob too: benchmarks/attention.py, or attention_prefill.py and
    # attention_decode.py after the split (C4), each its own stage.
    for family, limit in (("attention", 60), ("sampling", 45), ("topk", 40), ("linear", 45)):
        for module in kernel_benchmarks(family):
            stages.append(Stage(f"bench-{module}", bench(module), limit, collects_results=True,
                                after="build" if family == "topk" else None))  # fmt: skip
    stages += [
        Stage("profile", bench("profile"), 60, collects_results=True),
        Stage("bench-beam", bench("beam", *beam_extra), 60, collects_results=True),
    ]
    sanitize = [PY, "tests/sanitize_topk.py"]
    for tool, limit in (("memcheck", 60), ("racecheck", 90)):
        stages.append(Stage(f"sanitize-{tool}", ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *sanitize],
                            limit, after="build"))  # fmt: skip
    return stages


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's whole process group, SIGKILL what is left after 3 s."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class StageRun:
    """A started stage: its process (own process group), its output streamed to the console and
    the log, its deadline."""

    #: Stages whose process may still run (killed if the run itself is stopped).
    active: set["StageRun"] = set()

    def __init__(self, stage: Stage, limit_s: float, env: dict, log: "CappedLog", results_dir: Path | None):
        self.stage, self.limit_s, self.results_dir = stage, limit_s, results_dir
        self.lines: list[str] = []  # every line (test output is parsed from it)
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.started = time.monotonic()
        self.deadline = self.started + limit_s
        log.write(f"\n=== {stage.name} (limit {limit_s:.0f} s): {' '.join(stage.cmd)}\n")
        self.proc = subprocess.Popen(
            stage.cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, errors="replace", bufsize=1,
        )  # fmt: skip
        StageRun.active.add(self)  # before any output: a stop may come as soon as the stage runs
        self.reader = threading.Thread(target=self._pump, args=(log,), daemon=True)
        self.reader.start()

    def _pump(self, log: "CappedLog") -> None:
        prefix = f"[{self.stage.name}] " if self.stage.background else ""
        for line in self.proc.stdout:
            self.lines.append(line)
            self.tail.append(line)
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
            log.write(prefix + line)

    def finish(self) -> dict:
        """Wait until the process ends or its deadline passes (then kill its group); the stage row."""
        timed_out = False
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.proc)
            if self.stage.on_kill:
                self.stage.on_kill()
        self.reader.join(timeout=10)
        StageRun.active.discard(self)
        seconds = time.monotonic() - self.started
        rc = self.proc.returncode
        if timed_out:
            status = "timed out"
        elif rc == 0 or (self.stage.pytest_file and rc == 5):  # 5: no test of this file is marked cuda
            status = "ok"
        else:
            status = "failed"
        return dict(status=status, exit_code=rc, seconds=round(seconds, 1), limit_s=round(self.limit_s, 1),
                    output_tail="".join(self.tail)[-TAIL_CHARS:])  # fmt: skip


class CappedLog:
    """The run's full text log, which stops growing at :data:`LOG_CAP_BYTES`."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")
        self.size = 0
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            if self.size >= LOG_CAP_BYTES:
                return
            text = text[: LOG_CAP_BYTES - self.size]
            if self.size + len(text) >= LOG_CAP_BYTES:
                text += "\n[log capped; every result is in gpu_check.jsonl]\n"
            self.f.write(text)
            self.f.flush()
            self.size += len(text)


PYTEST_RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def parse_pytest(output: str) -> dict:
    """Counts and failure names from ``pytest -v -rfE`` output, complete or cut off by a timeout.

    The per-test lines give the counts and names as the run goes; the short summary at the end
    (present only when pytest finished) adds each failure's message.
    """
    counts: dict[str, int] = {}
    failures = []
    for name, outcome in PYTEST_RESULT.findall(output):
        key = outcome.lower()
        counts[key] = counts.get(key, 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failures.append(name)
    messages = dict(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+) - (.*)$", output, flags=re.M))
    failures = [f"{name} - {messages[name]}"[:300] if name in messages else name for name in failures]
    for path, reason in re.findall(r"^ERROR (\S+)(?: - (.*))?$", output, flags=re.M):
        if "::" not in path:  # a file that could not even be collected
            failures.append(f"{path} (collection: {reason or 'error'})"[:300])
    return dict(counts=counts, failures=failures[:50])


def collect_benchmark(stage: str, results_dir: Path, out_dir: Path, files_left: int) -> int:
    """Record each JSON file a benchmark wrote as a ``benchmark`` row plus one row per ``rows``
    entry; copy its plots into ``out_dir`` while the file count allows. Returns plots copied."""
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            record(stage, "benchmark", name=path.stem, payload={"error": f"unreadable: {exc}"})
            continue
        rows = payload.get("rows", []) if isinstance(payload, dict) else []
        head = {k: v for k, v in payload.items() if k != "rows"} if isinstance(payload, dict) else {"value": payload}
        record(stage, "benchmark", name=path.stem, payload=head, n_rows=len(rows))
        for row in rows:
            record(stage, "benchmark_row", name=path.stem, row=row)
    copied = 0
    for png in sorted(results_dir.glob("*.png")):
        if copied < files_left and png.stat().st_size <= MAX_FILE_BYTES and PLAIN_NAME.match(png.name):
            shutil.copy(png, out_dir / png.name)
            copied += 1
        else:
            record(stage, "note", text=f"plot {png.name} not sent back (file limit)")
    return copied


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _stage_env(out_dir: Path, dry_run: bool, results_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", RESULTS_DIR=str(results_dir))
    env[JSONL_ENV] = str(out_dir / JSONL_NAME)
    if dry_run:
        env[DRY_RUN_ENV] = "1"
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop(DRY_RUN_ENV, None)
        env.pop("TRITON_INTERPRET", None)
    return env


def _skip_reason(stage: Stage) -> str | None:
    exe = stage.cmd[0]
    if exe != PY and shutil.which(exe) is None:
        return f"{exe} not found"
    if "-m" in stage.cmd:
        module = stage.cmd[stage.cmd.index("-m") + 1]
        if module.startswith("benchmarks.") and not (REPO_ROOT / (module.replace(".", "/") + ".py")).exists():
            return f"{module} missing"
    for arg in stage.cmd[1:]:
        if arg.endswith(".py") and "/" in arg and not (REPO_ROOT / arg).exists():
            return f"{arg} missing"
    return None


def _stop_on_signal(signum, frame) -> None:
    """The run itself is stopped (a timeout around it): a stage in its own process session would
    outlive it, so kill every running stage's group first; the summary is still written."""
    for run in list(StageRun.active):
        _kill_group(run.proc)
    record("gpu-check", "stopped", signal=signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def run_all(out_dir: Path, *, budget_s: float, dry_run: bool, max_test_files: int | None = None) -> list[dict]:
    """Run every stage of :func:`plan` within ``budget_s``; return the stage rows."""
    from benchmarks.common import git_commit

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ[JSONL_ENV] = str(out_dir / JSONL_NAME)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    log = CappedLog(out_dir / LOG_NAME)
    started = time.monotonic()
    record("gpu-check", "start", budget_s=budget_s, dry_run=dry_run, commit=git_commit(), python=sys.version.split()[0],
           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    stages = plan(dry_run, max_test_files=max_test_files)
    group_spent: dict[str, float] = {}
    background: dict[str, StageRun] = {}
    stage_rows: list[dict] = []
    plots_left = MAX_FILES - 3  # the .jsonl, the .json and the log
    staging = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def close(run: StageRun) -> None:
        row = record(run.stage.name, "stage", **run.finish())
        stage_rows.append(row)

    try:
        for stage in stages:
            if stage.after and stage.after in background:
                close(background.pop(stage.after))
            left = budget_s - (time.monotonic() - started)
            limit = min(stage.limit_s, left)
            if stage.group:
                group_limit = TEST_GROUP_LIMIT_S
                limit = min(limit, group_limit - group_spent.get(stage.group, 0.0))
            reason = _skip_reason(stage)
            if reason is None and limit < min(MIN_STAGE_S, stage.limit_s):
                reason = "budget spent"
            if reason:
                stage_rows.append(record(stage.name, "stage", status="skipped", reason=reason))
                continue
            # Every stage writes its files into its own staging folder, never into out_dir: only
            # what is recorded (and a few plots) comes back.
            results_dir = staging / stage.name.replace(":", "-")
            results_dir.mkdir()
            env = _stage_env(out_dir, dry_run, results_dir)
            env.update(stage.env)
            run = StageRun(stage, limit, env, log, results_dir)
            if stage.background:
                background[stage.name] = run
                continue
            result = run.finish()
            if stage.group:
                group_spent[stage.group] = group_spent.get(stage.group, 0.0) + result["seconds"]
            if stage.pytest_file:
                record(stage.name, "tests", file=stage.pytest_file, status=result["status"],
                       seconds=result["seconds"], **parse_pytest("".join(run.lines)))  # fmt: skip
            if stage.collects_results:
                plots_left -= collect_benchmark(stage.name, results_dir, out_dir, plots_left)
            stage_rows.append(record(stage.name, "stage", **result))
        for run in background.values():
            close(run)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record("gpu-check", "end", seconds=round(time.monotonic() - started, 1))
    return stage_rows


def write_summary(out_dir: Path) -> dict:
    """``gpu_check.json`` from the .jsonl, and the table printed last."""
    run = assemble(read_rows(out_dir / JSONL_NAME))
    (out_dir / SUMMARY_NAME).write_text(json.dumps(run, indent=1, default=str) + "\n")
    print_summary(run)
    return run


def print_summary(run: dict) -> None:
    print("\n==================== gpu-check summary ====================")
    print(f"device: {run['header'].get('device', '?')}   commit: {run['header'].get('commit', '?')}")
    for s in run["stages"]:
        print(f"  {s['stage']:<28}{s['status']:<11}{s.get('seconds', ''):>7}  {s.get('reason', '')}")
    bad = [c for c in run["smoke"] if c.get("ok") is False]
    print(f"smoke: {sum(c.get('ok') is True for c in run['smoke'])} checks ok, {len(bad)} failed")
    for c in bad:
        print(f"  FAILED {c.get('check')}: {c.get('error') or c.get('detail') or ''}"[:200])
    for h in run["headline"]:
        if h.get("engine") == "fastgpt" or "error" in h:
            print(f"  headline {h.get('model')} b{h.get('batch')}: {h.get('tokens_per_s', float('nan')):.0f} tok/s, "
                  f"x{h.get('speedup_vs_hf_eager', float('nan')):.2f} vs HF eager, greedy match {h.get('greedy_match')}"
                  f"{' ERROR ' + h['error'] if 'error' in h else ''}")  # fmt: skip
    for t in run["tests"]:
        print(f"  {t['file']:<40}{t['status']:<11}{t['counts']}")
        for name in t["failures"]:
            print(f"      {name}")
    for name, bench in run["benchmarks"].items():
        print(f"  benchmark {name}: {len(bench.get('rows', []))} rows")


# --------------------------------------------------------------------------------------------
# What a lent machine would send back
# --------------------------------------------------------------------------------------------
#: Stages whose exit status reports kernel results: failing there is a finding, not broken plumbing.
KERNEL_FINDING_STAGES = ("smoke", "build")


def verify_dry_run(out_dir: Path, stages: list[Stage]) -> list[str]:
    """What the dry run must show: sendable files, a row for every stage, each stage's own rows,
    and the killed stage's rows written before it was killed."""
    problems = check_sendable(out_dir)
    rows = read_rows(out_dir / JSONL_NAME)
    run = assemble(rows)
    status = {s["stage"]: s for s in run["stages"]}
    for stage in stages:
        state = status.get(stage.name, {}).get("status")
        if state is None:
            problems.append(f"stage {stage.name}: no stage row")
        elif stage.name in KERNEL_FINDING_STAGES and state == "failed":
            pass  # a kernel check that fails is a finding about the kernels (printed), not the plumbing
        elif stage.name != "killed-demo" and state not in ("ok", "skipped"):
            problems.append(f"stage {stage.name}: {state}")
    if not any(c.get("check") == "device" for c in run["smoke"]):
        problems.append("smoke: no device row")
    if len([c for c in run["smoke"] if c.get("stage") == "smoke"]) < 5:
        problems.append("smoke: fewer than 5 check rows")
    if not any(c.get("stage") == "build" for c in run["smoke"]):
        problems.append("build: no check row")
    if not any(h.get("engine") == "fastgpt" and "greedy_match" in h for h in run["headline"]):
        problems.append("headline: no fastgpt row with greedy_match")
    if not run["tests"]:
        problems.append("tests: no test-file row")
    if not run["benchmarks"]:
        problems.append("benchmarks: no benchmark rows")
    demo = status.get("killed-demo", {})
    if demo.get("status") != "timed out":
        problems.append(f"killed-demo: status {demo.get('status')!r}, expected 'timed out'")
    if [c.get("check") for c in run["smoke"] if c.get("stage") == "killed-demo"] != ["first", "second"]:
        problems.append("killed-demo: its two rows are missing")
    if not (out_dir / SUMMARY_NAME).exists():
        problems.append(f"{SUMMARY_NAME} missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the prepared GPU check (see the module docstring)")
    parser.add_argument("--unpack", type=Path, metavar="PATH", help="gpu_check.jsonl / .json (or their folder) -> benchmarks/results/")
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="where --unpack writes")
    parser.add_argument("--dry-run", action="store_true", help="the same orchestration on the CPU, then check what would come back")
    parser.add_argument("--results-dir", type=Path, default=None, help="output folder (default $RESULTS_DIR; dry run: a temporary one)")
    parser.add_argument("--max-test-files", type=int, default=None, help="run only the first N test files (dry run default 1)")
    args = parser.parse_args(argv)
    if args.unpack:
        unpack(args.unpack, args.dest)
        return 0

    if args.dry_run:
        budget = float(os.environ.get("GPU_CHECK_BUDGET_S", DRY_RUN_BUDGET_S))
        max_files = args.max_test_files if args.max_test_files is not None else 1
        out_dir = (args.results_dir or Path(tempfile.mkdtemp(prefix="gpu-check-dry-"))).resolve()
    else:
        budget = float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S))
        max_files = args.max_test_files
        out_dir = (args.results_dir or Path(os.environ.get("RESULTS_DIR", "/tmp/fastgpt-gpu-check"))).resolve()
    for name in (JSONL_NAME, LOG_NAME, SUMMARY_NAME):  # one run per folder: never mix two runs' rows
        (out_dir / name).unlink(missing_ok=True)
    try:
        stage_rows = run_all(out_dir, budget_s=budget, dry_run=args.dry_run, max_test_files=max_files)
    finally:
        write_summary(out_dir)  # also when the run was stopped: from what the .jsonl holds
    if args.dry_run:
        problems = verify_dry_run(out_dir, plan(True, max_test_files=max_files))
        print(f"\ndry run: results in {out_dir}")
        for c in assemble(read_rows(out_dir / JSONL_NAME))["smoke"]:
            if c.get("ok") is False:
                print(f"  finding (kernel, not plumbing): {c['stage']} {c.get('check')} failed")
        for p in problems:
            print(f"  PROBLEM: {p}")
        print("dry run: OK" if not problems else f"dry run: {len(problems)} problem(s)")
        return 0 if not problems else 1
    failed = [r["stage"] for r in stage_rows if r["status"] not in ("ok", "skipped")]
    print(f"results in {out_dir}; " + (f"stages not ok: {', '.join(failed)}" if failed else "every stage ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
