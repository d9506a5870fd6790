"""``make gpu-check``'s plumbing, proven on the CPU: the dry run and the pieces it is made of.

The real command has never run on a GPU, so everything but the GPU itself is checked here: the
dry run (``python -m benchmarks.gpu_check --dry-run``: every stage's command on tiny shapes under
the Triton interpreter) must leave a folder a lent machine can send back (<= 8 plain-named files,
none over 16 MiB, no deep folders), a ``.jsonl`` row for every stage and each stage's own rows,
and a stage killed at its limit must keep the rows it wrote. ``--unpack`` must read a truncated
``.jsonl``. The dry run runs once per session (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu-check-dry")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop(gc.JSONL_ENV, None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--results-dir", str(out_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = gc.read_rows(out_dir / gc.JSONL_NAME)
    return dict(proc=proc, out_dir=out_dir, rows=rows, run=gc.assemble(rows), seconds=time.monotonic() - start)


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` has ended (and been reaped) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _stage_rows(run: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in run["stages"]}


def test_dry_run_passes_its_own_checks(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "dry run: OK" in proc.stdout


def test_dry_run_leaves_what_a_lent_machine_sends_back(dry_run):
    out_dir = dry_run["out_dir"]
    files = sorted(p.name for p in out_dir.rglob("*") if p.is_file())
    assert {gc.JSONL_NAME, gc.SUMMARY_NAME, gc.LOG_NAME} <= set(files)
    assert len(files) <= gc.MAX_FILES, files
    for p in out_dir.rglob("*"):
        rel = p.relative_to(out_dir)
        assert len(rel.parts) <= 2, rel
        assert all(gc.PLAIN_NAME.match(part) for part in rel.parts), rel
        assert not p.is_file() or p.stat().st_size <= gc.MAX_FILE_BYTES, rel
    assert gc.check_sendable(out_dir) == []


def test_dry_run_has_a_row_for_every_stage(dry_run):
    stages = _stage_rows(dry_run["run"])
    planned = [s.name for s in gc.plan(True, max_test_files=1)]
    assert set(planned) <= set(stages), set(planned) - set(stages)
    ran = ["build", "smoke", "headline", "profile", "bench-beam"] + [n for n in planned if n.startswith("bench-")]
    assert any(n.startswith("bench-attention") for n in ran) and any(n.startswith("bench-topk") for n in ran)
    for name in ran:
        assert stages[name]["status"] in ("ok", "failed"), (name, stages[name])  # ran (failed: a kernel finding)
    for name, row in stages.items():
        assert row["status"] in ("ok", "failed", "timed out", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], row


def test_dry_run_rows_of_each_stage(dry_run):
    run = dry_run["run"]
    assert run["header"]["dry_run"] is True and run["header"]["device"].startswith("cpu")
    smoke = {c["check"]: c for c in run["smoke"] if c["stage"] == "smoke"}
    for check in ("device", "prefill", "decode-default-splits", "layernorm", "sampler", "graph-replay", "sampler-nonfinite"):
        assert check in smoke, sorted(smoke)
        assert isinstance(smoke[check].get("ok"), bool), smoke[check]
    assert any(name.startswith("gemv-") for name in smoke) and any(name.startswith("decode-split") for name in smoke)
    assert smoke["prefill"]["ok"] and smoke["prefill"]["rel_err"] < 1e-4 and "us" in smoke["prefill"]
    assert smoke["graph-replay"]["ok"] and smoke["graph-replay"]["path"] == "graph"
    build = {c["check"]: c for c in run["smoke"] if c["stage"] == "build"}
    assert build["topk-extension"]["backend"] == "cpu-ext" and build["topk"]["ok"]
    # The headline's CPU rows: a GPT-2 one and a LLaMA-family one (HF's LlamaForCausalLM), each engine.
    engines = {(h["model"], h["engine"]): h for h in run["headline"] if "engine" in h}
    assert set(engines) == {(m, e) for m in ("small-d256", "tiny-llama") for e in ("hf-eager", "fastgpt")}
    for model in ("small-d256", "tiny-llama"):
        fast = engines[model, "fastgpt"]
        assert fast["greedy_match"] is True and fast["tokens_per_s"] > 0 and fast["dtype"] == "float32", fast
        assert fast["bytes_per_token"] > 0 and fast["roofline_frac"] is None  # no copy bandwidth measured on a CPU
    (tests,) = run["tests"]
    assert tests["file"] == gc.test_files(cuda_only=True)[0] and tests["status"] == "ok"
    # No GPU: conftest deselects the CUDA-only tests (one summary line), so none ran and none failed;
    # the parsing of real per-test lines is tested on recorded pytest output below.
    assert set(tests["counts"]) <= {"skipped", "passed"}
    attention = [name for name in run["benchmarks"] if name.startswith("attention")]
    assert attention and all(run["benchmarks"][name]["rows"] for name in attention)
    assert all(run["benchmarks"][name]["device"].startswith("cpu") for name in attention)


def test_dry_run_killed_stage_keeps_its_rows(dry_run):
    run = dry_run["run"]
    demo = _stage_rows(run)["killed-demo"]
    assert demo["status"] == "timed out" and demo["seconds"] < demo["limit_s"] + 10
    assert [c["check"] for c in run["smoke"] if c["stage"] == "killed-demo"] == ["first", "second"]


def test_unpack_reads_a_truncated_jsonl(dry_run, tmp_path):
    text = (dry_run["out_dir"] / gc.JSONL_NAME).read_text()
    cut = text.index('"kind": "benchmark_row"')  # mid-line, inside the first benchmark's rows
    first = json.loads(text[:cut].splitlines()[-2])  # the line before the cut one
    assert first["kind"] == "benchmark"  # its header row came before
    by_device = lambda name: re.sub(r"_cpu$", "", name) + "_cpu.json"  # noqa: E731
    truncated = tmp_path / gc.JSONL_NAME
    truncated.write_text(text[:cut])
    names = {p.name for p in gc.unpack(truncated, tmp_path / "results")}
    assert {"gpu_check_cpu.json", by_device(first["name"])} <= names  # named by device
    summary = json.loads((tmp_path / "results" / "gpu_check_cpu.json").read_text())
    assert summary["smoke"] and summary["headline"] and summary["stages"]
    assert summary["other"][-1] == {"stage": "gpu-check", "kind": "unreadable", "lines": 1}
    # The complete run, from gpu_check.json: each benchmark with its rows put back together.
    gc.unpack(dry_run["out_dir"] / gc.SUMMARY_NAME, tmp_path / "from-json")
    for name, bench in dry_run["run"]["benchmarks"].items():
        unpacked = json.loads((tmp_path / "from-json" / by_device(name)).read_text())
        assert unpacked == json.loads(json.dumps(bench)) and unpacked["device"].startswith("cpu")


# --------------------------------------------------------------------------------------------
# The pieces, without the dry run
# --------------------------------------------------------------------------------------------
def test_stage_is_killed_with_its_whole_process_group(tmp_path):
    # The stage starts a grandchild that would outlive a plain kill of the stage process.
    stage = gc.Stage("hang", ["bash", "-c", "sleep 300 & echo child $!; wait"], 2)
    log = gc.CappedLog(tmp_path / "log")
    run = gc.StageRun(stage, 2, dict(os.environ), log, None)
    result = run.finish()
    assert result["status"] == "timed out" and result["seconds"] < 10
    child = int(next(line.split()[1] for line in run.lines if line.startswith("child")))
    assert _gone_within(child, 10)


def test_parse_pytest_counts_a_cut_off_verbose_run():
    output = (
        "tests/test_a.py::test_one PASSED                  [ 10%]\n"
        "tests/test_a.py::test_two[x-1] FAILED             [ 20%]\n"
        "tests/test_a.py::test_three SKIPPED (needs a CUDA GPU) [ 30%]\n"
        "tests/test_a.py::test_four PASS"  # the kill came mid-line
    )
    parsed = gc.parse_pytest(output)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failures"] == ["tests/test_a.py::test_two[x-1]"]
    finished = gc.parse_pytest(output + "ED\n=== short test summary info ===\nFAILED tests/test_a.py::test_two[x-1] - assert 1 == 2\n")
    assert finished["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert finished["failures"] == ["tests/test_a.py::test_two[x-1] - assert 1 == 2"]
    collection = gc.parse_pytest("ERROR tests/test_b.py - ModuleNotFoundError: No module named 'scipy'\n")
    assert collection["failures"] == ["tests/test_b.py (collection: ModuleNotFoundError: No module named 'scipy')"]


def test_read_rows_skips_a_garbled_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"stage": "a", "kind": "check", "ok": true}\n{"stage": "b", "kind": "ch')
    rows = gc.read_rows(path)
    assert rows == [{"stage": "a", "kind": "check", "ok": True}, {"stage": "gpu-check", "kind": "unreadable", "lines": 1}]


def test_test_files_most_valuable_first():
    files = gc.test_files()
    assert files[0] == "tests/test_cuda_graph.py"
    assert "tests/test_gpu_check.py" in files and len(files) == len(set(files))
    ranked = [f for f in files if any(key in f for key in gc.TEST_PRIORITY)]
    assert files[: len(ranked)] == ranked  # every prioritised file before the rest
    cuda_files = gc.test_files(cuda_only=True)
    assert cuda_files == [f for f in files if f in cuda_files]  # same order
    assert "tests/test_cuda_graph.py" in cuda_files and "tests/test_gpu_check.py" not in cuda_files


def test_check_sendable_names_each_problem(tmp_path):
    for i in range(gc.MAX_FILES + 1):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a b.png").write_text("x")
    (tmp_path / "d1" / "d2").mkdir(parents=True)
    (tmp_path / "d1" / "d2" / "deep.txt").write_text("x")
    problems = gc.check_sendable(tmp_path)
    assert any("at most 8 come back" in p for p in problems)
    assert any("a b.png: not a plain name" in p for p in problems)
    assert any("deep.txt: deeper than one subfolder" in p for p in problems)


def test_kernel_benchmarks_found_by_family():
    assert gc.kernel_benchmarks("topk") == ["topk"]
    assert gc.kernel_benchmarks("attention")  # attention.py, or attention_prefill/_decode.py after the split
    assert gc.kernel_benchmarks("no_such_kernel") == []


def test_device_slug():
    assert gc.device_slug("NVIDIA H200") == "h200"
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gc.device_slug("cpu (x86_64, 2 cores)") == "cpu"


def test_make_gpu_check_installs_nothing():
    out = subprocess.run(["make", "-n", "gpu-check", "RESULTS_DIR=/tmp/x"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip" not in out.stdout and "benchmarks.gpu_check" in out.stdout and "/tmp/x" in out.stdout


def test_stopping_the_run_kills_its_stages_and_still_writes_the_summary(tmp_path):
    # The whole run is stopped (as a timeout around `make gpu-check` would) while a stage runs:
    # the stage's process group must not outlive it, and gpu_check.json must still be written.
    script = (
        "import sys; from pathlib import Path; from benchmarks import gpu_check as gc\n"
        "gc.plan = lambda dry_run, max_test_files=None: [gc.Stage('hang', ['bash', '-c', 'sleep 300 & echo child $!; wait'], 60)]\n"
        f"gc.main(['--results-dir', {str(tmp_path)!r}])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    child = None
    for line in proc.stdout:
        if line.startswith("child"):
            child = int(line.split()[1])
            break
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + 15
    assert _gone_within(child, 10)
    run = json.loads((tmp_path / gc.SUMMARY_NAME).read_text())
    assert run["other"][-1]["kind"] == "stopped" and run["other"][-1]["signal"] == "SIGTERM"


def test_build_stage_fails_and_says_why_without_the_extension(tmp_path):
    # No compiler: the extension cannot build, and the build stage must fail (not fall back).
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CXX="/bin/false", TRITON_INTERPRET="1",
               FASTGPT_EXT_CACHE=str(tmp_path), FASTGPT_CACHE_DIR=str(tmp_path), GPU_CHECK_JSONL=str(tmp_path / "rows.jsonl"))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "benchmarks.smoke", "--build"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = gc.read_rows(tmp_path / "rows.jsonl")
    assert row["check"] == "topk-extension" and row["ok"] is False and row["backend"] == "torch-fallback"
    assert "could not be built" in row["error"]  # the build's own reason, not just "failed"
