"""The host side of the decode loop (CPU): no device-to-host read per token.

On a GPU every ``.item()`` / ``bool(tensor)`` / ``.tolist()`` / ``.cpu()`` of a CUDA tensor stalls
the host until the GPU has caught up, so the loop must launch token after token without reading
anything back. These tests count every Python-level host read of a tensor during ``generate``
(``torch.Tensor.item`` and friends patched to count) and compare a short with a long generation:
the difference is what the loop does per token. (On a GPU, tests/test_cuda_graph.py also runs the
loop under ``torch.cuda.set_sync_debug_mode("error")``.)
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

from tests.models import pair

# The module, not the function fastgpt.generate that the package exports under the same name.
gen = importlib.import_module("fastgpt.generate")

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def count_host_reads(monkeypatch):
    """A Counter of host reads of tensors, by method name, while it is enabled."""
    counts: Counter = Counter()
    state = {"on": False}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):
            if state["on"]:
                counts[__name] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    class Recorder:
        def run(self, fn):
            counts.clear()
            state["on"] = True
            try:
                result = fn()
            finally:
                state["on"] = False
            return result, Counter(counts)

    return Recorder()


@pytest.fixture(params=["0", "emulate"])
def graph_mode(request, monkeypatch):
    """Both loops: the eager step, and the graph path's bookkeeping with emulated replays."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", request.param)
    from fastgpt import cuda_graph

    cuda_graph.clear_graph_cache()
    yield request.param
    cuda_graph.clear_graph_cache()


def test_the_counter_sees_host_reads(count_host_reads):
    t = torch.ones(3)
    _, counts = count_host_reads.run(lambda: (bool(t.all()), t.sum().item(), int(t[0]), t.tolist()))
    assert counts["__bool__"] == 1 and counts["item"] == 1 and counts["__int__"] == 1 and counts["tolist"] == 1


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)])
def test_no_host_read_per_token_without_eos(count_host_reads, graph_mode, sampling):
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 5))
    # Warm both shapes first (in emulate mode, the first call of a shape captures its graph).
    model.generate(ids, 20, **sampling)
    model.generate(ids, 2, **sampling)
    _, short = count_host_reads.run(lambda: model.generate(ids, 2, **sampling))
    _, long = count_host_reads.run(lambda: model.generate(ids, 20, **sampling))
    assert long == short, f"host reads grow with the number of tokens: {short} -> {long}"


def test_with_eos_the_host_checks_every_sync_every_steps_only(count_host_reads, graph_mode):
    hf, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 5))
    free = model.generate(ids, 34)
    unused = next(t for t in range(503) if t not in free.tolist()[0] + free.tolist()[1])
    n_new = 34  # decode steps run at n_done = 1 .. 33; checks at multiples of SYNC_EVERY
    model.generate(ids, n_new, eos_token_id=unused)  # warm (graph capture in emulate mode)
    model.generate(ids, 2, eos_token_id=unused)
    out_2, short = count_host_reads.run(lambda: model.generate(ids, 2, eos_token_id=unused))
    out_n, long = count_host_reads.run(lambda: model.generate(ids, n_new, eos_token_id=unused))
    assert torch.equal(out_n, free)
    checks = len([n for n in range(1, n_new) if n % gen.SYNC_EVERY == 0])
    assert checks == 2
    extra = long - short
    assert extra == Counter({"__bool__": checks}), f"expected {checks} finished-flag reads, got {dict(extra)}"


def test_early_stop_is_exact_whatever_sync_every(monkeypatch, graph_mode):
    """Checking rarely only costs extra steps; the result is trimmed to HF's."""
    hf, model = pair("tiny-503")
    ids = torch.randint(0, 503, (3, 4))
    free = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = int(free[0, 4 + 2])
    expected = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=eos)
    results = []
    for every in (1, 5, 64):
        monkeypatch.setattr(gen, "SYNC_EVERY", every)
        results.append(model.generate(ids, 24, eos_token_id=eos, pad_token_id=0))
    for got in results:
        assert torch.equal(got, expected)


def test_step_reads_no_host_state_that_changes_per_token(graph_mode):
    """Decoder.step's only host-side effect is cache.pos += 1 (what a graph replay mirrors)."""
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 6))
    with torch.inference_mode():
        decoder = gen.Decoder.create(model, 2, 20, eos_token_ids=[7], pad_token_id=0, min_new_tokens=2)
        try:
            tokens = decoder.prefill(ids)
            before = {k: v for k, v in vars(decoder).items() if not isinstance(v, torch.Tensor)}
            cache_before = {k: v for k, v in vars(decoder.cache).items() if not isinstance(v, torch.Tensor)}
            step = decoder.graph.step if decoder.graph is not None else decoder.step
            for _ in range(5):
                tokens = step(tokens)
            after = {k: v for k, v in vars(decoder).items() if not isinstance(v, torch.Tensor)}
            cache_after = {k: v for k, v in vars(decoder.cache).items() if not isinstance(v, torch.Tensor)}
        finally:
            if decoder.graph is not None:
                decoder.graph.release()
    assert after == before
    assert cache_after.pop("pos") == cache_before.pop("pos") + 5
    assert cache_after == cache_before
    assert int(decoder.cache.pos_tensor) == decoder.cache.pos == 6 + 5
    assert int(decoder.n_generated) == 6 and int(decoder.sampling.step) == 6
