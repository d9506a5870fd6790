"""Helpers shared by the kernel tests: launch counting and sm_90 compile checks in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class LaunchCounter:
    """Stands in for a @triton.jit kernel in its module and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def run_compile_workers(test_module: str, specs: list, n_workers: int = 2) -> list[dict]:
    """Run ``tests.<test_module>._compile_worker`` over ``specs`` in ``n_workers`` processes.

    The workers compile for sm_90 with the interpreter off (``kernels.utils.compile_for_hopper``
    cannot rebuild kernels that call other jit functions while ``TRITON_INTERPRET=1``); each reads
    its share of the specs as JSON on stdin and prints its results as JSON on its last line.
    Results come back in the order of ``specs``' round-robin shares.
    """
    chunks = [specs[i::n_workers] for i in range(n_workers) if specs[i::n_workers]]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"from tests.{test_module} import _compile_worker; _compile_worker()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in chunks
    ]
    results = []
    for proc, chunk in zip(procs, chunks):
        stdout, stderr = proc.communicate(json.dumps(chunk), timeout=600)
        assert proc.returncode == 0, f"compile worker failed:\n{stderr[-4000:]}"
        results += json.loads(stdout.strip().splitlines()[-1])
    assert len(results) == len(specs)
    return results
