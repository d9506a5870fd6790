"""The host side of the decode loop (CPU): no device-to-host read per token.

On a GPU every ``.item()`` / ``bool(tensor)`` / ``.tolist()`` / ``.cpu()`` of a CUDA tensor stalls
the host until the GPU has caught up, so the loop must launch token after token without reading
anything back. These tests count every Python-level host read of a tensor during ``generate``
(``torch.Tensor.item`` and friends patched to count) and compare a short with a long generation:
the difference is what the loop does per token. (On a GPU, tests/test_cuda_graph.py also runs the
loop under ``torch.cuda.set_sync_debug_mode("error")``.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastgpt import cuda_graph, generation
from fastgpt.decoder import Decoder
from fastgpt.settings import GenerationSettings
from tests.helpers import HostReadCounter, emulate_graph_replay
from tests.models import pair

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts host reads of tensors while its ``run`` is active."""
    return HostReadCounter(monkeypatch)


@pytest.fixture(params=["eager", "graph"])
def graph_mode(request, monkeypatch):
    """Both loops: the eager step, and the graph path's bookkeeping with the replay emulated."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    if request.param == "graph":
        emulate_graph_replay(monkeypatch)
    else:
        monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
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
    checks = len([n for n in range(1, n_new) if n % generation.SYNC_EVERY == 0])
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
        monkeypatch.setattr(generation, "SYNC_EVERY", every)
        results.append(model.generate(ids, 24, eos_token_id=eos, pad_token_id=0))
    for got in results:
        assert torch.equal(got, expected)


def _graph_or_decoder(model, batch, max_len, **options):
    """The graph-owned decoder (and its replay) when the graph path applies, else a fresh one."""
    settings = GenerationSettings.create(model.config, 1, max_len - 1, **options)
    graph, _ = cuda_graph.GraphCache.graph_for(model, settings, batch, max_len, None)
    if graph is not None:
        return graph, graph.decoder, graph.step
    decoder = Decoder.create(model, settings, batch, max_len)
    return None, decoder, decoder.step


def test_step_reads_no_host_state_that_changes_per_token(graph_mode):
    """Decoder.step's only host-side effect is cache.pos += 1 (what a graph replay mirrors)."""
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 6))
    with torch.no_grad():
        graph, decoder, step = _graph_or_decoder(model, 2, 20, eos_token_id=[7], pad_token_id=0, min_new_tokens=2)
        assert (graph is not None) == (graph_mode == "graph")
        try:
            tokens = decoder.prefill(ids)
            before = {k: v for k, v in vars(decoder).items() if not isinstance(v, torch.Tensor)}
            cache_before = {k: v for k, v in vars(decoder.cache).items() if not isinstance(v, torch.Tensor)}
            for _ in range(5):
                tokens = step(tokens)
            after = {k: v for k, v in vars(decoder).items() if not isinstance(v, torch.Tensor)}
            cache_after = {k: v for k, v in vars(decoder.cache).items() if not isinstance(v, torch.Tensor)}
        finally:
            if graph is not None:
                graph.release()
    assert after == before
    assert cache_after.pop("pos") == cache_before.pop("pos") + 5
    assert cache_after == cache_before
    assert int(decoder.cache.pos_tensor) == decoder.cache.pos == 6 + 5
    assert int(decoder.n_generated) == 6 and int(decoder.sampling.step) == 6


def _count_ops(fn) -> Counter:
    """The aten ops ``fn`` dispatches (each a kernel launch on a GPU), by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        fn()
    return counts


#: The aten ops one decode step of tiny-503 (2 layers, batch 2) dispatched on the torch backend
#: before the generation layer was rebuilt (commit 908547e, measured with the same counter):
#: the rebuilt step must not launch more.
STEP_OPS_BEFORE = {"plain": 68, "eos-ban": 78, "sampling": 124}
#: Added on purpose since (issue 10, contract C1): the PyTorch sampler's status check (NaN, +inf,
#: every token banned) and its first-step record, 43 aten ops counted with the same counter (views
#: included). The Triton sampler does the same check inside its two launches.
STATUS_CHECK_OPS = {"plain": 0, "eos-ban": 0, "sampling": 43}
STEP_OPTIONS = {
    "plain": dict(),
    "eos-ban": dict(eos_token_id=[7, 9], min_new_tokens=3),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=20, seed=1),
}


@pytest.mark.parametrize("case", list(STEP_OPTIONS))
def test_decode_step_launches_do_not_grow(case, monkeypatch):
    """The ops one decode step dispatches (each a kernel launch on a GPU), counted on the CPU."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 6))
    settings = GenerationSettings.create(model.config, 6, 10, **STEP_OPTIONS[case])
    with torch.inference_mode():  # as generation.run decodes
        decoder = Decoder.create(model, settings, 2, 16)
        tokens = decoder.prefill(ids)
        first = _count_ops(lambda: decoder.step(tokens))
        second = _count_ops(lambda: decoder.step(tokens))
    assert first == second, "a step launches the same ops every time"
    assert sum(first.values()) <= STEP_OPS_BEFORE[case] + STATUS_CHECK_OPS[case], dict(first)


# --------------------------------------------------------------------------------------------
# The Triton decode step (embedding kernel, the sampler's bookkeeping) against the oracles
# --------------------------------------------------------------------------------------------
@pytest.fixture
def triton_eager(monkeypatch):
    """The Triton backend (interpreter on a CPU), decoding eagerly; reports reset."""
    from fastgpt.backend import reset_kernels_report
    from fastgpt.kernels.utils import reset_launch_record

    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
    reset_kernels_report()
    reset_launch_record()


def _assert_fused_step_ran(eos: bool, ban: bool) -> None:
    """The step ran the Triton embedding and the sampler with its bookkeeping (no fallback)."""
    from fastgpt.backend import kernels_report
    from fastgpt.kernels.utils import launch_record

    ran, launches = kernels_report(), launch_record()
    assert ran["embedding"] == "triton" and ran["sample"] == "triton"
    sample = launches["sample"]
    assert sample["impl"] == "triton" and sample["advance"] and sample["eos"] == eos and sample["ban_eos"] == ban


def _hf_generate(hf, ids, n_new, mask=None, **options):
    return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                       max_new_tokens=n_new, do_sample=False, **options)  # fmt: skip


def test_triton_step_matches_hf_greedy(triton_eager):
    hf, model = pair("hd64-257")
    ids = torch.randint(0, 257, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = _hf_generate(hf, ids, 8, pad_token_id=0)
    assert torch.equal(model.generate(ids, 8), expected)
    _assert_fused_step_ran(eos=False, ban=False)


def test_triton_step_matches_hf_with_several_eos_ids_and_min_new_tokens(triton_eager):
    hf, model = pair("hd64-257")
    ids = torch.randint(0, 257, (2, 4), generator=torch.Generator().manual_seed(2))
    free = _hf_generate(hf, ids, 10, pad_token_id=0)
    # Row 0's 3rd token and row 1's 5th token are EOS ids: rows finish at different steps.
    eos = [int(free[0, 4 + 2]), int(free[1, 4 + 4])]
    expected = _hf_generate(hf, ids, 10, pad_token_id=0, eos_token_id=eos)
    got = model.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    _assert_fused_step_ran(eos=True, ban=False)
    # min_new_tokens bans every EOS id for the first 4 tokens (inside the sampler's first kernel).
    expected = _hf_generate(hf, ids, 10, pad_token_id=0, eos_token_id=eos, min_new_tokens=4)
    got = model.generate(ids, 10, eos_token_id=eos, pad_token_id=0, min_new_tokens=4)
    assert torch.equal(got, expected)
    _assert_fused_step_ran(eos=True, ban=True)


def test_triton_step_matches_hf_on_a_left_padded_batch(triton_eager):
    from tests.helpers import left_padded

    hf, model = pair("hd64-257")
    ids, mask = left_padded(257, [6, 3, 1], pad_id=0, seed=3)
    free = _hf_generate(hf, ids, 6, mask, pad_token_id=0)
    eos = [int(free[1, 6 + 1])]
    expected = _hf_generate(hf, ids, 6, mask, pad_token_id=0, eos_token_id=eos)
    got = model.generate(ids, 6, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    _assert_fused_step_ran(eos=True, ban=False)


def test_triton_sampling_matches_the_torch_backend_drawing_the_same_noise(monkeypatch):
    """Sampling: the Triton step (ban, EOS, counters inside the sampler) against the PyTorch step
    whose draw is the same Gumbel race (``reference.filter_logits`` + the sampler's own noise of
    (seed, step, row)): the same tokens, step for step -- the RNG step advances identically."""
    from fastgpt import reference
    from fastgpt.kernels.sampling import gumbel_noise

    seed = 5
    options = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=seed, pad_token_id=0)

    def race(logits, temperature, top_k, top_p, min_p, generator=None, *, status=None, step=0):
        x = reference.filter_logits(logits, temperature, top_k, top_p, min_p)  # (B, V), -inf outside
        noise = gumbel_noise(x.shape[0], x.shape[1], torch.tensor([seed]), step.reshape(1))
        return (x + noise).argmax(dim=-1)

    _, model = pair("hd64-257")
    ids = torch.randint(0, 257, (2, 4), generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    free = model.generate(ids, 10, **options)  # EOS ids the rows do draw
    eos = [int(free[0, 4 + 3]), int(free[1, 4 + 6]), 256]
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTGPT_BACKEND", backend)
        with monkeypatch.context() as patch:
            if backend == "torch":
                patch.setattr(reference, "sample", race)
            results[backend] = model.generate(ids, 10, eos_token_id=eos, min_new_tokens=2, **options)
    assert torch.equal(results["triton"], results["torch"])
    _assert_fused_step_ran(eos=True, ban=True)
