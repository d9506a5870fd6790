"""The model against transformers' GPT2LMHeadModel: logits parity, KV-cache path, configs."""

import pytest
import torch

from fastgpt import GPT
from tests.models import SMALL_CONFIGS, hf_gpt2, pair


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
    assert model.lm_head is None and not any("lm_head" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        model.wte.weight[3].zero_()  # the head's row 3 is the embedding's row 3: its logit becomes 0
        logits = model(torch.tensor([[1, 2, 4]]))
    assert torch.all(logits[..., 3] == 0) and torch.all(logits[..., 4] != 0)


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


#: GPT-2 config flags that change what HF computes; fastgpt must follow each one.
HF_FLAGS = {
    "no-attn-scale": dict(scale_attn_weights=False),
    "inverse-layer-scale": dict(scale_attn_by_inverse_layer_idx=True),
    "both-scales": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
    "reorder-upcast": dict(reorder_and_upcast_attn=True),
    "n_inner-100": dict(n_inner=100),
    "gelu_fast": dict(activation_function="gelu_fast"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "gelu-erf": dict(activation_function="gelu"),
    "gelu_python": dict(activation_function="gelu_python"),
}


def _untie(hf):
    """Give ``hf`` an LM head of its own, as a user would: ``hf.lm_head.weight = Parameter(...)``."""
    torch.manual_seed(7)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.08)
    return hf


@pytest.mark.parametrize("flags", list(HF_FLAGS))
def test_hf_config_flags_are_followed(flags):
    hf = hf_gpt2("odd-1001", attn_implementation="eager", **HF_FLAGS[flags])
    model = GPT.from_hf(hf)
    ids = torch.randint(0, 1001, (2, 11))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    # The decode path (one token at a time against the cache) follows the flags too.
    out = model.generate(ids, 6)
    assert torch.equal(out, hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)))


def test_untied_lm_head_is_used():
    hf = _untie(hf_gpt2("odd-1001"))
    model = GPT.from_hf(hf)
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.detach())
    ids = torch.randint(0, 1001, (2, 9))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert torch.equal(model.generate(ids, 5), hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)))


def test_accelerate_follows_an_untied_head_set_after_wrapping():
    import fastgpt

    hf = hf_gpt2("odd-1001")
    fast = fastgpt.accelerate(hf)
    _untie(hf)  # a new Parameter: the wrapper sees new weights and copies them again
    ids = torch.randint(0, 1001, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(fast.generate(ids, **kwargs), hf.generate(ids, **kwargs))
    assert fast.model.lm_head is not None


def test_untied_config_round_trips_through_save_pretrained(tmp_path):
    hf = hf_gpt2("tiny-503", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    assert not model.config.tie_word_embeddings
    ids = torch.randint(0, 503, (1, 7))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_unsupported_activation_is_refused_by_name(tmp_path):
    hf = hf_gpt2("tiny-503", activation_function="relu")
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_hf(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json.*activation_function='relu'"):
        GPT.from_pretrained(str(tmp_path))


def test_attention_scale_flags_on_the_triton_kernels(monkeypatch):
    """The scale flags reach the Triton attention kernels (interpreter on CPU), not a fallback."""
    from fastgpt import kernels_report, reset_kernels_report

    hf = hf_gpt2("hd64-257", attn_implementation="eager", scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    model = GPT.from_hf(hf)
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    reset_kernels_report()
    ids = torch.randint(0, 257, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        prefill = model(ids[:, :5], cache)
        step = model(ids[:, 5:], cache)
        expected = hf(ids).logits
    ran = kernels_report()
    assert ran["attention.prefill"] == "triton" and ran["attention.decode"] == "triton"
    assert (torch.cat([prefill, step], 1) - expected).abs().max().item() < 1e-3
