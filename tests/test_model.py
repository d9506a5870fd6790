"""The model against transformers' GPT2LMHeadModel: logits parity, KV-cache path, configs."""

import pytest
import torch

from fastgpt import GPT, GPTConfig, PRESETS
from fastgpt.config import ACTIVATIONS
from tests.models import SMALL_CONFIGS, pair


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_logits_match_transformers_fp32(name):
    hf, model = pair(name)
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_lm_head_is_tied_to_token_embedding():
    _, model = pair()
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    model.wte.weight.data[3].add_(1.0)  # changing the embedding changes the head's logit for token 3
    x = torch.randn(1, 1, model.config.n_embd)
    assert torch.allclose(model.lm_head(x)[0, 0, 3], (x[0, 0] * model.wte.weight[3]).sum())


@pytest.mark.parametrize("name", ["tiny-503", "odd-1001"])
def test_cache_path_matches_full_forward_at_every_step(name):
    _, model = pair(name)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(3, 20)
        step_logits = [model(ids[:, :8], cache)]  # prefill 8 tokens
        for t in range(8, 20):
            step_logits.append(model(ids[:, t : t + 1], cache))
    cached = torch.cat(step_logits, dim=1)
    assert cache.pos == 20 and int(cache.pos_tensor) == 20
    assert (cached - full).abs().max().item() < 1e-4


def test_left_padded_rows_match_unpadded_logits():
    _, model = pair()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        cache.set_row_start(torch.tensor([0, 5], dtype=torch.int32))
        padded = model(ids, cache)
        alone = model(ids[1:, 5:])
    assert (padded[1, 5:] - alone[0]).abs().max().item() < 1e-4


def test_presets_have_gpt2_parameter_counts():
    counts = {name: round(cfg.num_parameters() / 1e6) for name, cfg in PRESETS.items()}
    assert counts == {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}
    with torch.device("meta"):
        model = GPT(PRESETS["gpt2"])
    assert sum(p.numel() for p in model.parameters()) == PRESETS["gpt2"].num_parameters()


def test_config_from_hf_round_trip():
    hf, _ = pair("odd-1001")
    cfg = GPTConfig.from_hf(hf.config)
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer) == (1001, 60, 5, 3)
    assert cfg.activation in ACTIVATIONS
    assert GPTConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 100, "n_head": 3}, "divisible"),
        ({"n_layer": 0}, "n_layer"),
        ({"activation": "relu"}, "activation"),
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_close(dtype):
    hf, model32 = pair()
    model = GPT.from_hf(hf, dtype=dtype)
    assert model.dtype == dtype
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = model32(ids)
        got = model(ids).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 3e-2


def test_forward_rejects_too_long_input():
    _, model = pair()
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, model.config.n_positions + 1, dtype=torch.long))
