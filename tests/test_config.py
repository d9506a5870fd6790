"""GPTConfig: presets, validation, the round trip to transformers' GPT2Config, and which HF
configs fastgpt refuses (unsupported_hf_config)."""

import math

import pytest
import torch
from transformers import GPT2Config

from fastgpt import GPT, GPTConfig, PRESETS
from fastgpt.config import ACTIVATIONS, unsupported_hf_config
from tests.models import pair


def test_presets_have_gpt2_parameter_counts():
    counts = {name: round(cfg.num_parameters() / 1e6) for name, cfg in PRESETS.items() if name.startswith("gpt2")}
    assert counts == {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}
    with torch.device("meta"):
        model = GPT(PRESETS["gpt2"])
    assert sum(p.numel() for p in model.parameters()) == PRESETS["gpt2"].num_parameters()


@pytest.mark.parametrize("overrides", [{"n_inner": 100}, {"tie_word_embeddings": False}])
def test_parameter_count_follows_mlp_width_and_untied_head(overrides):
    config = GPTConfig(vocab_size=101, n_positions=16, n_embd=24, n_head=2, n_layer=2, **overrides)
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_config_from_hf_round_trip():
    hf, _ = pair("odd-1001")
    cfg = GPTConfig.from_hf(hf.config)
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer) == (1001, 60, 5, 3)
    assert cfg.activation in ACTIVATIONS
    assert GPTConfig.from_hf(cfg.to_hf()) == cfg


def test_every_flag_survives_the_round_trip():
    cfg = GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_layer=3, activation="gelu",
                    tie_word_embeddings=False, n_inner=40, scale_attn_weights=False,
                    scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)  # fmt: skip
    assert GPTConfig.from_hf(cfg.to_hf()) == cfg
    assert GPTConfig.from_hf(cfg.to_hf().to_dict()) == cfg  # the config.json form


def test_attention_scale_follows_hf_rules():
    base = dict(n_embd=64, n_head=4)  # head_dim 16
    assert GPTConfig(**base).attention_scale(5) == 0.25
    assert GPTConfig(**base, scale_attn_weights=False).attention_scale(5) == 1.0
    assert GPTConfig(**base, scale_attn_by_inverse_layer_idx=True).attention_scale(3) == 0.25 / 4
    assert math.isclose(
        GPTConfig(**base, scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True).attention_scale(2), 1 / 3
    )


@pytest.mark.parametrize("n_embd, n_head", [(60, 5), (64, 4), (48, 3), (768, 12)])
def test_query_prescale_is_exactly_one_for_gpt2_scaling(n_embd, n_head):
    """GPT-2's own scaling must cost nothing: no extra multiply (1/sqrt(12) * sqrt(12) != 1.0)."""
    assert all(GPTConfig(n_embd=n_embd, n_head=n_head).query_prescale(i) == 1.0 for i in range(4))
    for flags in ({"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}):
        cfg = GPTConfig(n_embd=n_embd, n_head=n_head, **flags)
        for i in range(4):
            assert math.isclose(cfg.query_prescale(i) / math.sqrt(cfg.head_dim), cfg.attention_scale(i))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 100, "n_head": 3}, "divisible"),
        ({"n_layer": 0}, "n_layer must be an int >= 1, got 0"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"n_inner": 0}, "n_inner must be None or an int >= 1, got 0"),
        ({"scale_attn_weights": "yes"}, "scale_attn_weights must be a bool"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown preset"):
        GPT.from_config("gpt3")


def test_unsupported_hf_config_names_each_setting():
    assert unsupported_hf_config(GPT2Config()) == []
    assert unsupported_hf_config(GPT2Config(scale_attn_by_inverse_layer_idx=True, n_inner=10)) == []
    reasons = unsupported_hf_config(GPT2Config(activation_function="relu"))
    assert len(reasons) == 1 and "activation_function='relu'" in reasons[0] and "gelu_new" in reasons[0]
    assert "model_type='gemma'" in unsupported_hf_config({"model_type": "gemma"})[0]
    assert "hidden_act='gelu'" in unsupported_hf_config({"model_type": "llama", "hidden_act": "gelu"})[0]
    with pytest.raises(ValueError, match="activation_function='quick_gelu'"):
        GPTConfig.from_hf(GPT2Config(activation_function="quick_gelu"))


def test_from_hf_config_names_a_missing_field():
    with pytest.raises(ValueError, match="has no n_embd"):
        GPTConfig.from_hf({"vocab_size": 10, "n_head": 2, "n_layer": 1})
