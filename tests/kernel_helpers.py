"""Helpers shared by the kernel tests: launch counting and sm_90 compile checks in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


def spill_bytes(cubin: bytes) -> int:
    """Bytes of stack / local memory (register spills) ptxas gave a compiled sm_90 kernel.

    Read with the ``cuobjdump`` Triton ships (``--dump-resource-usage``): Triton's own
    ``n_spills`` metadata is filled only when a GPU driver loads the kernel. Raises when the tool
    is missing, so a compile test never passes without having looked.
    """
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise FileNotFoundError(f"{tool} is missing: cannot read register spills")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(kv.split(":", 1) for line in out.splitlines() if "REG:" in line for kv in line.split() if ":" in kv)
    if "REG" not in usage:
        raise ValueError(f"no resource usage in cuobjdump's output:\n{out}")
    return int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0))
