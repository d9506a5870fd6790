"""One graph for many prompt lengths: generate() sizes the KV cache to a bucket (issue 14).

The rule (:func:`fastgpt.kv_cache.bucket_length`) is checked on its own; then a chat-like
sequence of calls on a random GPT-2 with 640 positions runs through the graph path with the
replay emulated (``tests.helpers.emulate_graph_replay``): it must capture at most 4 graphs, every
cache it builds (graph or eager) must have a bucket's length, and every call's tokens must equal
Hugging Face's.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastgpt import GPT, last_generate_stats
from fastgpt import cuda_graph
from fastgpt.cuda_graph import cached_graphs, clear_graph_cache
from fastgpt.kv_cache import BUCKET_STEP, bucket_length
from tests import models
from tests.helpers import RecordingStreamer, emulate_graph_replay

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: (vocab, n_positions, n_embd, n_head, n_layer): long enough for 400-token prompts + 200 tokens.
LONG_CONFIG = (503, 640, 48, 3, 2)


@pytest.fixture(autouse=True)
def fresh_graph_cache():
    clear_graph_cache()
    yield
    clear_graph_cache()


@pytest.mark.parametrize(
    "n_tokens,n_positions,expected",
    [
        (1, 1024, 256), (256, 1024, 256), (257, 1024, 512), (600, 1024, 768), (769, 1024, 1024),
        (1025, 4096, 1536), (1537, 4096, 2048), (2049, 4096, 3072), (4000, 4096, 4096),
        (600, 600, 600), (10, 64, 64), (64, 64, 64), (513, 640, 640),
    ],
)  # fmt: skip
def test_bucket_length_rule(n_tokens, n_positions, expected):
    assert bucket_length(n_tokens, n_positions) == expected


def test_bucket_length_bounds_waste_and_counts_buckets():
    lengths = {bucket_length(n, 1024) for n in range(1, 1025)}
    assert lengths == {256, 512, 768, 1024}  # GPT-2: every call shares one of 4 shapes
    for n in range(1, 8193):
        b = bucket_length(n, 8192)
        assert n <= b <= 8192
        assert b - n < BUCKET_STEP or (b - n) / b < 1 / 3, (n, b)
    assert len({bucket_length(n, 8192) for n in range(1, 8193)}) == 10  # 4 up to 1024, then 2 per octave


@pytest.mark.parametrize("n_tokens", [0, 65])
def test_bucket_length_rejects_lengths_outside_the_position_table(n_tokens):
    with pytest.raises(ValueError, match=rf"n_tokens must be in \[1, n_positions=64\], got {n_tokens}"):
        bucket_length(n_tokens, 64)


def test_twenty_chat_like_calls_capture_at_most_4_graphs_and_equal_transformers(monkeypatch):
    monkeypatch.setitem(models.SMALL_CONFIGS, "long-503", LONG_CONFIG)
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    emulate_graph_replay(monkeypatch)
    captures = []
    emulated_capture = cuda_graph.DecodeGraph.capture

    def counted_capture(graph, *args, **kwargs):
        captures.append(graph.key)
        return emulated_capture(graph, *args, **kwargs)

    monkeypatch.setattr(cuda_graph.DecodeGraph, "capture", counted_capture)
    cache_lengths = []
    real_new_cache = GPT.new_cache

    def spied_new_cache(self, batch, max_len):
        cache_lengths.append(max_len)
        return real_new_cache(self, batch, max_len)

    monkeypatch.setattr(GPT, "new_cache", spied_new_cache)
    hf, model = models.pair("long-503")
    rng = random.Random(14)
    calls = [(rng.randint(1, 400), rng.randint(1, 200)) for _ in range(20)]
    assert len({bucket_length(t + n, 640) for t, n in calls}) >= 3  # the draw spans several buckets
    for i, (prompt_len, n_new) in enumerate(calls):
        ids = torch.randint(0, 503, (1, prompt_len), generator=torch.Generator().manual_seed(i))
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                               min_new_tokens=n_new, do_sample=False, pad_token_id=0)  # fmt: skip
        cache_lengths.clear()
        got = model.generate(ids, n_new)
        stats = last_generate_stats()
        assert torch.equal(got, expected), f"call {i} (prompt {prompt_len}, {n_new} new) differs from HF"
        assert stats["path"] == ("graph" if n_new > 1 else "eager"), (i, stats)
        bucket = bucket_length(prompt_len + n_new, 640)
        if n_new > 1:
            assert stats["key"].max_len == bucket
        # Every cache this call built has the bucket's length (prefill-only and graph alike).
        assert set(cache_lengths) <= {bucket}, (i, cache_lengths)
    assert 1 <= len(captures) <= 4, captures
    assert len(captures) == len(set(captures)), "a shape was captured twice (evicted and recaptured)"
    assert {k.max_len for k in cached_graphs(model)} <= {256, 512, 640}


def test_eager_path_uses_the_bucket_too(monkeypatch):
    """Graphs off: the eager loop builds the same bucket-sized cache (so both sum alike on a GPU)."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
    monkeypatch.setitem(models.SMALL_CONFIGS, "long-503", LONG_CONFIG)
    _, model = models.pair("long-503")
    seen = []
    real_new_cache = GPT.new_cache
    monkeypatch.setattr(GPT, "new_cache", lambda self, b, n: seen.append(n) or real_new_cache(self, b, n))
    model.generate(torch.randint(0, 503, (2, 300)), 5)
    model.generate(torch.randint(0, 503, (1, 3)), 4, streamer=RecordingStreamer())
    assert seen == [512, 256]
    assert last_generate_stats()["path"] == "eager"



@pytest.mark.cuda
def test_one_real_graph_serves_a_bucket_and_equals_eager_on_cuda(monkeypatch):
    """Triton backend, real graphs: three prompt lengths of one bucket (512) capture once, and each
    call's tokens equal the eager Triton loop's, whose cache has the same length (split count)."""
    from fastgpt import GPTConfig, kernels_report, reset_kernels_report

    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    config = GPTConfig(vocab_size=1001, n_positions=1024, n_embd=128, n_head=2, n_layer=2)
    model = GPT.from_config(config, dtype=torch.float32, device="cuda", seed=0)
    with torch.no_grad():  # wider than GPT-2's init, so greedy decoding produces varied tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.half()
    captured = []
    for prompt_len, n_new in ((300, 50), (200, 100), (400, 60)):
        ids = torch.randint(0, 1001, (1, prompt_len), device="cuda")
        monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
        reset_kernels_report()
        expected = model.generate(ids, n_new)
        assert kernels_report().get("attention.decode") == "triton"
        monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
        got = model.generate(ids, n_new)
        stats = last_generate_stats()
        assert stats["path"] == "graph" and stats["key"].max_len == 512, stats
        captured.append(stats["captured"])
        assert torch.equal(got, expected), (prompt_len, n_new)
    assert captured == [True, False, False]
