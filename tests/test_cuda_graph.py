"""The graph-captured decode step (fastgpt.cuda_graph).

CPU tests run the graph path's bookkeeping (persistent state per shape, in-place reset and reload
per call, host position kept by hand, warm-up undone, LRU, invalidation, fallback) with the
replay replaced by an eager call of the same step (``tests.helpers.emulate_graph_replay``): the
tokens must equal the plain eager loop's. CUDA tests (``@pytest.mark.cuda``) capture real graphs with the
Triton backend and compare them token for token with the eager Triton step, check that the
steady-state loop allocates nothing and never syncs, and that a failed capture falls back with
one warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastgpt import GPT, GPTConfig, cuda_graph, kernels_report, last_generate_stats, reset_kernels_report
from fastgpt import backend as backend_module
from fastgpt.cuda_graph import GraphCache, cached_graphs, clear_graph_cache
from fastgpt.decoder import Decoder
from fastgpt import generation
from fastgpt.generation import run
from fastgpt.settings import GenerationSettings
from tests.helpers import emulate_graph_replay, left_padded
from tests.models import pair


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(autouse=True)
def fresh_graph_cache():
    clear_graph_cache()
    yield
    clear_graph_cache()


def generate_with(monkeypatch, mode, model, ids, n, **kwargs):
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", mode)
    out = model.generate(ids, n, **kwargs)
    return out, last_generate_stats()


def graph_decoder(model, batch, max_len, **options):
    """``(graph, its decoder)`` for a generation of this shape and these settings (None, a fresh
    decoder when the graph path does not apply); the graph is in use until released."""
    settings = GenerationSettings.create(model.config, 1, max_len - 1, **options)
    graph, _ = GraphCache.graph_for(model, settings, batch, max_len, None)
    return graph, graph.decoder if graph is not None else Decoder.create(model, settings, batch, max_len)


# ============================================================================================
# CPU: the graph path's bookkeeping, the replay emulated
# ============================================================================================
@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")


@pytest.fixture
def emulated(monkeypatch, torch_backend):
    emulate_graph_replay(monkeypatch)


def test_mode_parsing_and_cpu_default(monkeypatch, torch_backend):
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (1, 4))
    monkeypatch.delenv("FASTGPT_CUDA_GRAPH", raising=False)
    assert cuda_graph.graph_enabled()
    model.generate(ids, 3)
    stats = last_generate_stats()
    assert stats["path"] == "eager" and stats["reason"] == "not a CUDA device"
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
    model.generate(ids, 3)
    assert last_generate_stats()["reason"].startswith("disabled")
    assert cuda_graph.unavailable_reason("cuda", "torch") is not None  # never with the torch backend
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "sometimes")
    with pytest.raises(ValueError, match="FASTGPT_CUDA_GRAPH"):
        model.generate(ids, 3)
    assert cached_graphs(model) == []


def test_emulated_graph_equals_eager_across_calls_with_new_prompts_and_settings(monkeypatch, emulated):
    """One persistent state per shape, reset and reloaded per call: every call equals eager."""
    _, model = pair("odd-1001")
    calls = [
        (dict(), [7, 7, 7]),
        (dict(do_sample=True, temperature=0.9, top_k=30, seed=3), [7, 4, 2]),
        (dict(do_sample=True, top_p=0.8, min_p=0.05, seed=5), [5, 7, 1]),
        (dict(), [2, 7, 6]),
    ]
    for i, (kwargs, lengths) in enumerate(calls):
        ids, mask = left_padded(1001, lengths, low=2)
        expected, eager_stats = generate_with(monkeypatch, "0", model, ids, 18, attention_mask=mask, **kwargs)
        got, stats = generate_with(monkeypatch, "1", model, ids, 18, attention_mask=mask, **kwargs)
        assert torch.equal(got, expected), f"call {i} ({kwargs}) differs from eager"
        assert eager_stats["path"] == "eager"
        assert stats["path"] == "graph" and stats["captured"] == (i == 0)
        assert stats["decode_steps"] == 17
    assert len(cached_graphs(model)) == 1


def test_emulated_graph_with_eos_and_min_new_tokens_equals_transformers(monkeypatch, emulated):
    hf, model = pair("tiny-503")
    ids, mask = left_padded(503, [6, 3, 8], low=2)
    T = ids.shape[1]
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=1)
    eos = int(free[0, T + 3])
    for kwargs in (dict(), dict(min_new_tokens=5)):
        expected = hf.generate(
            ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=1, eos_token_id=eos, **kwargs
        )
        for _ in range(2):  # captured, then reused
            got, stats = generate_with(
                monkeypatch, "1", model, ids, 30, attention_mask=mask, pad_token_id=1, eos_token_id=eos, **kwargs
            )
            assert stats["path"] == "graph"
            assert torch.equal(got, expected)
    keys = cached_graphs(model)
    assert [(k.n_eos, k.ban_eos_early) for k in keys] == [(1, False), (1, True)]


def test_the_persistent_state_is_reused_and_released(monkeypatch, emulated):
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 5))
    options = dict(do_sample=True, temperature=0.7, seed=9)
    expected, _ = generate_with(monkeypatch, "0", model, ids, 12, **options)
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    settings = GenerationSettings.create(model.config, 5, 12, **options)
    seen = []
    for _ in range(2):
        got = run(model, settings, ids, None)
        assert torch.equal(got, expected)
        (key,) = cached_graphs(model)
        graph = GraphCache.of(model).entries[key]
        assert not graph.in_use  # released by the loop
        seen.append((graph.decoder, graph.decoder.cache.k.data_ptr()))
    assert seen[0][0] is seen[1][0] and seen[0][1] == seen[1][1]


def test_busy_graph_and_processors_decode_eagerly(monkeypatch, emulated):
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (1, 4))
    with torch.inference_mode():
        held, _ = graph_decoder(model, 1, 4 + 6)
        assert held is not None and held.in_use
        other, _ = graph_decoder(model, 1, 4 + 6)  # same shape while the first is in use
        assert other is None
        held.release()
    expected, _ = generate_with(monkeypatch, "0", model, ids, 6, repetition_penalty=1.3)
    got, stats = generate_with(monkeypatch, "1", model, ids, 6, repetition_penalty=1.3)
    assert torch.equal(got, expected)
    assert stats["path"] == "eager" and "processors" in stats["reason"]


def test_lru_eviction_and_invalidation_when_weights_are_replaced(monkeypatch, emulated):
    monkeypatch.setenv("FASTGPT_GRAPH_CACHE_SIZE", "2")
    _, model = pair("tiny-503")
    prompts = {batch: torch.randint(0, 503, (batch, 4)) for batch in (1, 2, 3)}
    for batch in (1, 2, 3):  # three shapes (every length shares the one bucket of tiny-503)
        generate_with(monkeypatch, "1", model, prompts[batch], 4)
    assert [k.batch for k in cached_graphs(model)] == [2, 3]
    generate_with(monkeypatch, "1", model, prompts[2], 4)  # reuse moves it to the back
    assert [k.batch for k in cached_graphs(model)] == [3, 2]
    # A replaced parameter (new storage) must not be read through a stale graph.
    with torch.no_grad():
        model.ln_f.weight = torch.nn.Parameter(model.ln_f.weight.clone() * 1.5)
    expected, _ = generate_with(monkeypatch, "0", model, prompts[2], 4)
    got, stats = generate_with(monkeypatch, "1", model, prompts[2], 4)
    assert stats["captured"] and torch.equal(got, expected)
    assert [k.batch for k in cached_graphs(model)] == [2]
    clear_graph_cache(model)
    assert cached_graphs(model) == []


def test_capture_failure_falls_back_to_eager_with_one_warning_emulated(monkeypatch, emulated):
    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 4))
    expected, _ = generate_with(monkeypatch, "0", model, ids, 10)

    def failing_capture(self, n_warmup=3):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(cuda_graph.DecodeGraph, "capture", failing_capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, stats_1 = generate_with(monkeypatch, "1", model, ids, 10)
        second, stats_2 = generate_with(monkeypatch, "1", model, ids, 10)
    messages = [str(w.message) for w in caught if "decode step as a CUDA graph" in str(w.message)]
    assert len(messages) == 1 and "simulated capture failure" in messages[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert stats_1["path"] == stats_2["path"] == "eager"
    assert "capture failed" in stats_1["reason"] and "earlier" in stats_2["reason"]
    assert cached_graphs(model) == []


def test_load_undoes_the_warm_up(monkeypatch, emulated):
    """Capture warms up at the cache's last slot with EOS = token 0; a load must reset it all."""
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    _, model = pair("tiny-503")
    with torch.inference_mode():
        graph, decoder = graph_decoder(
            model, 3, 9, do_sample=True, temperature=0.5, top_k=7, seed=4, eos_token_id=[11, 12], pad_token_id=2,
            min_new_tokens=3,
        )  # fmt: skip
        try:
            assert graph is not None
            assert decoder.cache.pos == 0 and int(decoder.cache.pos_tensor) == 0
            assert int(decoder.n_generated) == 0 and int(decoder.sampling.step) == 0
            assert not decoder.finished.any() and not decoder.sampling.status.any()
            assert decoder.eos.tolist() == [11, 12] and int(decoder.pad) == 2 and int(decoder.min_new) == 3
            assert decoder.sampling.temperature.tolist() == [0.5] * 3 and decoder.sampling.top_k.tolist() == [7] * 3
            assert int(decoder.sampling.seed) == 4 and not decoder.cache.has_padding
        finally:
            graph.release()


def test_workspaces_are_allocated_before_the_warm_up(monkeypatch, emulated):
    """Issue 10: the decode step's scratch must exist before the (side-stream) warm-up runs, so
    that no workspace a graph replays into belongs to the side stream's pool."""
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    _, model = pair("tiny-503")
    calls = []
    original_init = cuda_graph.DecodeGraph.__init__

    def spy_init(self, model_, key):
        monkeypatch.setattr(backend_module, "allocate_workspaces",
                            lambda *args, **kwargs: calls.append(("allocate", args[-1])))  # fmt: skip
        original_init(self, model_, key)
        calls.append(("built", None))

    monkeypatch.setattr(cuda_graph.DecodeGraph, "__init__", spy_init)
    real_capture = cuda_graph.DecodeGraph.capture
    monkeypatch.setattr(cuda_graph.DecodeGraph, "capture", lambda self: (calls.append(("capture", None)), real_capture(self)))
    model.generate(torch.randint(0, 503, (1, 4)), 5)
    assert [c[0] for c in calls] == ["allocate", "built", "capture"]
    assert calls[0][1] == "torch"  # the backend the step runs on


# ============================================================================================
# CUDA: real graphs, Triton backend
# ============================================================================================
def cuda_model(dtype: torch.dtype, seed: int = 0) -> GPT:
    """A small GPT-2 with head_dim 64 (what the Triton attention supports) and "sharp" weights
    so that greedy decoding produces varied tokens."""
    config = GPTConfig(vocab_size=1001, n_positions=128, n_embd=128, n_head=2, n_layer=2)
    model = GPT.from_config(config, dtype=torch.float32, device="cuda", seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                p.uniform_(0.8, 1.2) if name.endswith("weight") else p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.08)
    return model.to(dtype)


@pytest.fixture
def triton_on_cuda(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")  # raises in resolve_backend if unusable


CUDA_CASES = [  # (batch, left padding, eos)
    (1, False, False),
    (1, False, True),
    (8, True, False),
    (8, True, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch, padded, with_eos", CUDA_CASES, ids=["b1", "b1-eos", "b8-pad", "b8-pad-eos"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_graph_step_equals_eager_step_token_for_token(monkeypatch, triton_on_cuda, dtype, batch, padded, with_eos, sampled):
    torch.manual_seed(batch * 10 + int(padded))
    model = cuda_model(dtype)
    if padded:
        ids, mask = left_padded(1001, [9 - (b % 5) for b in range(batch)], low=2, device="cuda")
    else:
        ids, mask = torch.randint(2, 1001, (batch, 9), device="cuda"), None
    T, n_new = ids.shape[1], 40
    kwargs = dict(attention_mask=mask, pad_token_id=1)
    if sampled:
        kwargs.update(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    if with_eos:
        free, _ = generate_with(monkeypatch, "0", model, ids, n_new, **kwargs)
        kwargs["eos_token_id"] = int(free[0, T + 3])  # row 0 ends by its 4th new token
    reset_kernels_report()
    expected, eager_stats = generate_with(monkeypatch, "0", model, ids, n_new, **kwargs)
    assert eager_stats["path"] == "eager"
    report = kernels_report()
    assert report.get("attention.decode") == "triton" and report.get("sample") == "triton", report
    reset_kernels_report()
    got, stats = generate_with(monkeypatch, "1", model, ids, n_new, **kwargs)
    assert stats["path"] == "graph" and stats["captured"], stats
    assert kernels_report().get("attention.decode") == "triton"  # recorded while capturing
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    again, stats = generate_with(monkeypatch, "1", model, ids, n_new, **kwargs)
    assert stats["path"] == "graph" and not stats["captured"]
    assert torch.equal(again, expected)
    if not with_eos:
        assert got.shape[1] == T + n_new
        assert len(set(got[0, T:].tolist())) > 3  # not a comparison of two constant runs
    else:
        assert (got[0, T + 4 :] == 1).all()  # row 0 finished: pads after its EOS


@pytest.mark.cuda
def test_graph_is_reused_across_calls_with_new_prompts_and_settings(monkeypatch, triton_on_cuda):
    model = cuda_model(torch.float16, seed=3)
    settings = [
        dict(),
        dict(do_sample=True, temperature=0.8, top_k=40, seed=1),
        dict(do_sample=True, top_p=0.9, min_p=0.05, seed=2),
        dict(do_sample=True, temperature=1.3, seed=3),
        dict(),
    ]
    lengths = [[12, 12, 12, 12], [12, 5, 9, 1], [3, 12, 12, 7], [12, 12, 2, 12], [6, 6, 12, 6]]
    pointers = set()
    for i, (kwargs, lens) in enumerate(zip(settings, lengths)):
        torch.manual_seed(100 + i)
        ids, mask = left_padded(1001, lens, low=2, device="cuda")
        expected, _ = generate_with(monkeypatch, "0", model, ids, 30, attention_mask=mask, pad_token_id=1, **kwargs)
        # "auto" (the default): on for CUDA with the Triton backend.
        got, stats = generate_with(monkeypatch, "auto", model, ids, 30, attention_mask=mask, pad_token_id=1, **kwargs)
        assert stats["path"] == "graph" and stats["captured"] == (i == 0), (i, stats)
        assert torch.equal(got, expected), f"call {i} ({kwargs}) differs from eager"
        (key,) = cached_graphs(model)
        pointers.add(GraphCache.of(model).entries[key].decoder.cache.k.data_ptr())
    assert len(pointers) == 1  # one KV cache, reused


def _warm_graph(model, batch, max_len):
    graph, _ = graph_decoder(model, batch, max_len)
    assert graph is not None, last_generate_stats()
    return graph


@pytest.mark.cuda
def test_zero_allocations_in_steady_state_graph_steps(triton_on_cuda, monkeypatch):
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    model = cuda_model(torch.float16)
    B, T, N = 2, 8, 64
    ids = torch.randint(2, 1001, (B, T), device="cuda")
    with torch.inference_mode():
        graph = _warm_graph(model, B, T + N)
        decoder = graph.decoder
        try:
            out = torch.empty((B, T + N), dtype=torch.long, device="cuda")
            tokens = graph.step(decoder.prefill(ids))
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            for i in range(N - 2):
                tokens = graph.step(tokens)
                out[:, T + 2 + i] = tokens
            torch.cuda.synchronize()
            after = torch.cuda.memory_stats()["allocation.all.allocated"]
        finally:
            graph.release()
    assert after == before, f"{after - before} allocations in {N - 2} graph steps"


@pytest.mark.cuda
def test_decode_loop_allocations_and_peak_memory_do_not_grow_with_new_tokens(triton_on_cuda, monkeypatch):
    """The whole loop (prefill + steps) at 10 and at 60 new tokens: same allocation count and
    the same peak, i.e. nothing per token and a workspace independent of the length."""
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    model = cuda_model(torch.float16)
    B, T, max_len = 4, 10, 80
    ids = torch.randint(2, 1001, (B, T), device="cuda")

    def measure(n_new):
        with torch.inference_mode():
            graph = _warm_graph(model, B, max_len)
            out = torch.empty((B, max_len), dtype=torch.long, device="cuda")
            out[:, :T] = ids
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            count0 = torch.cuda.memory_stats()["allocation.all.allocated"]
            base = torch.cuda.memory_allocated()
            try:
                generation._decode_loop(graph.decoder, graph.step, ids, out, n_new)
            finally:
                graph.release()
            torch.cuda.synchronize()
            return torch.cuda.memory_stats()["allocation.all.allocated"] - count0, torch.cuda.max_memory_allocated() - base

    measure(60)  # warm: captured by the first call, prefill kernels tuned
    allocs_10, peak_10 = measure(10)
    allocs_60, peak_60 = measure(60)
    assert allocs_60 == allocs_10, f"{allocs_60 - allocs_10} extra allocations for 50 more tokens"
    assert peak_60 == peak_10


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["1", "0"], ids=["graph", "eager"])
def test_decode_loop_never_syncs_without_eos(triton_on_cuda, monkeypatch, mode):
    """No sync per token: the only one is the sampler-status check at the end (contract C1)."""
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", mode)
    model = cuda_model(torch.float16)
    B, T, N = 2, 7, 40
    ids = torch.randint(2, 1001, (B, T), device="cuda")
    settings = GenerationSettings.create(model.config, T, N, do_sample=True, temperature=0.8, top_k=20, seed=5)
    checks = []
    original_check = Decoder.host_check

    def allowed_check(self):
        checks.append(True)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original_check(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(Decoder, "host_check", allowed_check)
    for measured in (False, True):  # the first run compiles, tunes and captures
        torch.cuda.synchronize()
        checks.clear()
        if measured:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                generation._fast(model, settings, ids, None, None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert checks == [True]  # one status check, at the end
    assert last_generate_stats()["path"] == ("graph" if mode == "1" else "eager")


@pytest.mark.cuda
def test_capture_failure_falls_back_to_eager_with_one_warning(triton_on_cuda, monkeypatch):
    model = cuda_model(torch.float32)
    ids = torch.randint(2, 1001, (2, 6), device="cuda")
    expected, _ = generate_with(monkeypatch, "0", model, ids, 20)
    original = backend_module.select_next_token

    def fails_while_capturing(logits, state, backend, **bookkeeping):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("simulated capture failure")
        return original(logits, state, backend, **bookkeeping)

    monkeypatch.setattr(backend_module, "select_next_token", fails_while_capturing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, stats_1 = generate_with(monkeypatch, "1", model, ids, 20)
        second, stats_2 = generate_with(monkeypatch, "1", model, ids, 20)
    messages = [str(w.message) for w in caught if "decode step as a CUDA graph" in str(w.message)]
    assert len(messages) == 1 and "simulated capture failure" in messages[0]
    assert stats_1["path"] == stats_2["path"] == "eager" and "capture failed" in stats_1["reason"]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the capture stream was left
    monkeypatch.setattr(backend_module, "select_next_token", original)
    clear_graph_cache(model)  # forget the failure: the same shape now captures
    got, stats = generate_with(monkeypatch, "1", model, ids, 20)
    assert stats["path"] == "graph" and torch.equal(got, expected)
