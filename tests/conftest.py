"""Test set-up shared by every test file.

Without a GPU the Triton kernels run in the Triton interpreter, which ``triton.jit`` reads when a
kernel module is imported: set it here, before any test imports ``kernels``.
Tests marked ``cuda`` are skipped cleanly when no GPU is present.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed_all():
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    spin-waiting makes every small op 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
