"""Test set-up shared by every test file.

Without a GPU the Triton kernels run in the Triton interpreter, which ``triton.jit`` reads when a
kernel module is imported: set it here, before any test imports ``kernels``.

Tests marked ``cuda`` are deselected when no GPU is present and summarised in ONE line at the
end, so that ``-rs`` lists only the skips worth reading.
"""

import os

import pytest
import torch

from tests.helpers import HAS_CUDA

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_cuda_only: list[str] = []


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    kept = [item for item in items if "cuda" not in item.keywords]
    dropped = [item for item in items if "cuda" in item.keywords]
    if dropped:
        _cuda_only[:] = [item.nodeid for item in dropped]
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _cuda_only:
        files = len({nodeid.split("::")[0] for nodeid in _cuda_only})
        terminalreporter.write_line(
            f"{len(_cuda_only)} CUDA-only tests in {files} files not run: no CUDA GPU (they run on a GPU machine)"
        )


@pytest.fixture
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    spin-waiting makes every small op 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
