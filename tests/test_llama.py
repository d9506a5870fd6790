"""The LLaMA family (Llama, Qwen2, Mistral) against transformers: logits, greedy and beam search
token for token, left-padded batches, loading, config conversion, accelerate(), sliding window.

Random weights of small configs with odd sizes (9 query heads on 3 K/V heads, multi-query, head_dim
64 and 128; tied and untied heads; Llama 3 rope scaling on and off), on the backend the machine
selects (the PyTorch reference ops on a CPU). The Triton kernels on these models:
tests/test_llama_kernels.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import fastgpt
from fastgpt import GPT
from fastgpt.config import PRESETS, GPTConfig, unsupported_hf_config
from tests.helpers import RecordingStreamer, left_padded
from tests.models import hf_llama_family

FAMILY = ("llama", "qwen2", "mistral")


def _prompts(vocab: int, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("model_type", FAMILY)
@pytest.mark.parametrize(
    "shape, tied, rope_scaling",
    [("gqa-9-3", False, False), ("mqa-4-1", True, True), ("hd128-4-2", False, True)],
)
def test_logits_match_transformers_fp32(model_type, shape, tied, rope_scaling):
    hf = hf_llama_family(model_type, shape, tied=tied, rope_scaling=rope_scaling)
    model = GPT.from_hf(hf)
    assert model.config.model_type == model_type and model.config.tie_word_embeddings == tied
    assert (model.lm_head is None) == tied
    ids = _prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", FAMILY)
def test_cached_decode_matches_full_forward(model_type):
    """Token by token through the KV cache (rotary positions from the cache slot) = one forward."""
    model = GPT.from_hf(hf_llama_family(model_type, "gqa-9-3", rope_scaling=True))
    ids = _prompts(model.config.vocab_size, batch=2, length=9)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", FAMILY)
@pytest.mark.parametrize("shape", ["gqa-9-3", "mqa-4-1"])
def test_greedy_tokens_equal_transformers(model_type, shape):
    hf = hf_llama_family(model_type, shape, rope_scaling=model_type == "llama")
    model = GPT.from_hf(hf)
    ids = _prompts(hf.config.vocab_size, batch=1, length=5)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=12), expected)
    assert len(set(expected[0, 5:].tolist())) > 2, "degenerate test: greedy repeats one token"


@pytest.mark.parametrize("model_type", FAMILY)
def test_left_padded_batch_equals_transformers(model_type):
    hf = hf_llama_family(model_type, "gqa-9-3", tied=model_type == "qwen2")
    model = GPT.from_hf(hf)
    ids, mask = left_padded(hf.config.vocab_size, [6, 2, 4], pad_id=0, seed=3)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_beam_search_equals_transformers(model_type):
    hf = hf_llama_family(model_type, "gqa-9-3")
    model = GPT.from_hf(hf)
    ids, mask = left_padded(hf.config.vocab_size, [4, 3], pad_id=0, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, pad_token_id=0)
    expected = hf.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)


def test_streaming_sampling_and_penalties_equal_transformers_where_defined():
    """Streaming gives HF's streamed tokens; a seed makes sampling reproducible; the processors
    (repetition penalty, no-repeat n-gram) give HF's greedy tokens on a LLaMA model too."""
    hf = hf_llama_family("qwen2", "gqa-9-3")
    model = GPT.from_hf(hf)
    ids = _prompts(hf.config.vocab_size, batch=1, length=4)
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=theirs)
    model.generate(ids, max_new_tokens=6, streamer=ours)
    assert len(ours.calls) == len(theirs.calls)
    assert all(a[0] == b[0] and (a[1] is None or torch.equal(a[1], b[1])) for a, b in zip(ours.calls, theirs.calls))
    kwargs = dict(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert torch.equal(model.generate(ids, **kwargs), hf.generate(ids, do_sample=False, pad_token_id=0, **kwargs))
    draws = [model.generate(ids, 8, do_sample=True, top_k=20, top_p=0.9, seed=s) for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("model_type", FAMILY)
def test_accelerate_is_a_drop_in(model_type):
    hf = hf_llama_family(model_type, "mqa-4-1", eos_token_id=3)
    fast = fastgpt.accelerate(hf, strict=True)
    assert fast.model is not None and fast.model.config.model_type == model_type
    ids = _prompts(hf.config.vocab_size, batch=2, length=4)
    kwargs = dict(max_new_tokens=9, do_sample=False, repetition_penalty=1.3, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_accelerate_falls_back_for_a_rope_it_does_not_compute():
    hf = hf_llama_family("llama", "mqa-4-1")
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert any("rope_type='linear'" in reason for reason in unsupported_hf_config(hf.config))
    fast = fastgpt.accelerate(hf)
    assert fast.model is None
    with pytest.warns(fastgpt.FallbackWarning, match="rope_type"):
        fast.generate(_prompts(hf.config.vocab_size, batch=1, length=3), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="rope_type='linear'"):
        GPT.from_hf(hf)


def test_accelerate_refuses_other_model_classes():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    hf = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                        attention_types=[[["global"], 1]]))  # fmt: skip
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        fastgpt.accelerate(hf)


# ---- loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, tied, shard", [("llama", False, False), ("qwen2", True, True), ("mistral", False, True)])
def test_from_pretrained_reads_save_pretrained(tmp_path, model_type, tied, shard):
    hf = hf_llama_family(model_type, "gqa-9-3", tied=tied, rope_scaling=model_type == "llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "50GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config == GPT.from_hf(hf).config
    ids = _prompts(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_missing_and_mismatched_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_llama_family("llama", "gqa-9-3")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        GPT.from_pretrained(str(tmp_path))
    state = load_file(tmp_path / "model.safetensors") | {"model.layers.1.mlp.up_proj.weight": torch.zeros(160, 100)}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\(160, 100\)"):
        GPT.from_pretrained(str(tmp_path))


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"config\.json.*'gemma'.*'gpt2', 'llama', 'qwen2', 'mistral'"):
        GPT.from_pretrained(str(tmp_path))


# ---- config ----------------------------------------------------------------------------------
def test_legacy_config_json_rope_fields():
    """Checkpoints saved before transformers 5 keep ``rope_theta`` / ``rope_scaling`` at the top level."""
    hf = hf_llama_family("llama", "gqa-9-3", rope_scaling=True, rope_theta=500000.0)
    modern = GPTConfig.from_hf(hf.config)
    legacy = hf.config.to_dict()
    rope = legacy.pop("rope_parameters")
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = rope
    assert GPTConfig.from_hf(legacy) == modern
    assert modern.rope_theta == 500000.0 and modern.rope_parameters()["factor"] == 8.0


@pytest.mark.parametrize("model_type", FAMILY)
def test_config_round_trips_through_transformers(model_type):
    config = GPTConfig.from_hf(hf_llama_family(model_type, "hd128-4-2", rope_scaling=model_type == "llama").config)
    assert GPTConfig.from_hf(config.to_hf()) == config


def test_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastgpt.rope import inverse_frequencies

    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        config = PRESETS[name]
        expected, scale = ROPE_INIT_FUNCTIONS["llama3"](config.to_hf(), "cpu")
        assert scale == 1.0 and torch.equal(inverse_frequencies(config), expected)
    hf = hf_llama_family("qwen2", "gqa-9-3", rope_theta=1e6)
    expected = hf.model.rotary_emb.inv_freq
    assert torch.equal(inverse_frequencies(GPTConfig.from_hf(hf.config)), expected)


@pytest.mark.parametrize(
    "name, billions",
    [("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("llama-3.1-8b", 8.03), ("qwen2.5-0.5b", 0.494),
     ("qwen2.5-1.5b", 1.54), ("mistral-7b-v0.1", 7.24), ("smollm2-135m", 0.135)],
)  # fmt: skip
def test_presets_have_the_released_sizes(name, billions):
    """Parameter counts of the released checkpoints, and the same count as transformers' model."""
    config = PRESETS[name]
    assert config.num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)
    with torch.device("meta"):
        hf = __import__("transformers").AutoModelForCausalLM.from_config(config.to_hf())
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_config_rejects_bad_grouping():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(model_type="llama", activation="silu", n_embd=576, n_head=9, n_kv_head=2, qkv_bias=False)
    with pytest.raises(ValueError, match="LLaMA-family settings"):
        GPTConfig(n_kv_head=4)


# ---- sliding window ----------------------------------------------------------------------------
def test_sliding_window_is_exact_inside_and_refused_beyond():
    hf = hf_llama_family("mistral", "gqa-9-3", sliding_window=24)
    model = GPT.from_hf(hf)
    assert model.config.sliding_window == 24 and model.config.max_context == 24
    ids = _prompts(hf.config.vocab_size, batch=1, length=6)
    expected = hf.generate(ids, max_new_tokens=18, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=18), expected)
    with pytest.raises(ValueError, match="sliding window"):
        model.generate(ids, max_new_tokens=19)
    with pytest.warns(fastgpt.FallbackWarning):
        fastgpt.accelerate(hf).generate(ids, max_new_tokens=19, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m"])
def test_fastgpt_model_of_a_preset_has_its_parameter_count(name):
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_parameters()
