"""GenerationSettings (fastgpt/settings.py): the one place arguments are checked and resolved.

Bad input must raise a clear TypeError/ValueError naming the argument (and the range) before any
work; defaults resolve as transformers resolves them; HF's "Unfeasible length constraints"
warnings are reproduced word for word.
"""

import math
import warnings

import pytest
import torch
from transformers import GenerationConfig

import fastgpt
from fastgpt import GPTConfig
from fastgpt.settings import GenerationSettings, check_prompt
from tests.models import hf_gpt2, pair

CONFIG = GPTConfig(vocab_size=503, n_positions=64, n_embd=48, n_head=3, n_layer=2)


def create(**kwargs):
    max_new = kwargs.pop("max_new_tokens", 5)
    return GenerationSettings.create(CONFIG, 5, max_new, **kwargs)


def test_greedy_settings_are_resolved_and_frozen():
    s = create(do_sample=False, temperature=0.3, top_k=4, top_p=0.5, min_p=0.1)
    assert s.greedy and (s.temperature, s.top_k, s.top_p, s.min_p) == (0.0, 0, 1.0, 0.0)
    assert create(do_sample=True, temperature=0).greedy  # temperature 0 is greedy
    s = create(do_sample=True, temperature=0.7, top_k=4)
    assert not s.greedy and (s.temperature, s.top_k, s.top_p, s.min_p) == (0.7, 4, 1.0, 0.0)
    with pytest.raises(AttributeError):
        s.temperature = 1.0  # frozen


def test_pad_defaults_to_the_first_eos_and_eos_forms():
    assert create(eos_token_id=[9, 4]).pad_token_id == 9
    assert create(eos_token_id=torch.tensor([3])).eos_token_ids == (3,)
    assert create(eos_token_id=5).eos_token_ids == (5,)
    assert create().pad_token_id == 0 and create().eos_token_ids is None


def test_outputs_are_kept_only_when_returned():
    assert not create(output_scores=True).output_scores
    assert create(output_scores=True, return_dict_in_generate=True).output_scores


BAD = [
    # issue 11 item 5: HF raises for non-finite and vanishing temperatures
    (dict(do_sample=True, temperature=math.nan), ValueError, "temperature"),
    (dict(do_sample=True, temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(do_sample=True, temperature=1e-39), ValueError, "temperature must be finite and >="),
    (dict(do_sample=False, temperature=math.nan), ValueError, "temperature"),
    (dict(do_sample=True, temperature=-1.0), ValueError, "temperature must be a number >= 0"),
    # issue 11 item 8: seeds name the argument and the range
    (dict(seed=2**64), ValueError, r"seed must be in \[-9223372036854775808, 9223372036854775807\], got 18446744073709551616"),
    (dict(seed=1.5), TypeError, "seed must be an int, got float"),
    (dict(seed="a"), TypeError, "seed must be an int, got str"),
    # issue 11 item 9
    (dict(eos_token_id=5.0), TypeError, "eos_token_id must be an int or a list of ints, got float"),
    (dict(eos_token_id=[5, 2.0]), TypeError, "eos_token_id must be an int or a list of ints"),
    (dict(eos_token_id=torch.tensor([5.0])), TypeError, "eos_token_id must hold integer token ids"),
    (dict(eos_token_id=[]), ValueError, "eos_token_id must not be empty"),
    (dict(top_k=0, do_sample=True), ValueError, "top_k must be >= 1, got 0"),
    (dict(top_p=1.5, do_sample=True), ValueError, "top_p"),
    (dict(min_p=-0.1, do_sample=True), ValueError, "min_p"),
    (dict(repetition_penalty=math.inf), ValueError, "repetition_penalty"),
    (dict(num_beams=2, do_sample=True, temperature=0.5), ValueError, "beam sampling"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences must be in"),
    (dict(num_return_sequences=2), ValueError, "greedy decoding returns one sequence"),
    (dict(early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(length_penalty=math.nan), ValueError, "length_penalty"),
    (dict(do_sample=1), TypeError, "do_sample must be a bool"),
    (dict(streamer=object()), TypeError, "streamer must have put"),
    (dict(num_beams=2, streamer=type("S", (), {"put": lambda s, x: 0, "end": lambda s: 0})()), ValueError, "streamer"),
    (dict(max_new_tokens=60), ValueError, "n_positions"),
    (dict(output_scores=1), TypeError, "output_scores must be a bool"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        create(**kwargs)


def test_the_native_generate_checks_through_settings_before_any_work(monkeypatch):
    _, model = pair()
    monkeypatch.setattr(model, "new_cache", lambda *a: pytest.fail("work started before the checks"))
    for kwargs, error, match in BAD:
        kwargs = dict(kwargs)
        n = kwargs.pop("max_new_tokens", 5)
        with pytest.raises(error, match=match):
            model.generate(torch.randint(0, 503, (1, 5)), n, **kwargs)


def test_generate_given_a_transformers_model_points_to_accelerate():
    hf = hf_gpt2()
    with pytest.raises(TypeError, match=r"fastgpt GPT model, got GPT2LMHeadModel.*fastgpt.accelerate"):
        fastgpt.generate(hf, torch.tensor([[1, 2]]), 3)


def test_check_prompt_forms():
    ids, row_start = check_prompt(torch.tensor([4, 5, 6]), torch.tensor([0, 1, 1]), 10)
    assert ids.shape == (1, 3) and row_start.tolist() == [1]
    assert check_prompt(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long), 10)[1] is None
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        check_prompt(torch.tensor([[4, 5]]), [[1, 1]], 10)


def _hf_warnings(hf, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.generate(torch.tensor([[1, 2, 3]]), do_sample=False, pad_token_id=0, **kwargs)
    return sorted(str(w.message) for w in caught if "Unfeasible" in str(w.message))


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=4, min_new_tokens=6), dict(max_new_tokens=4, min_length=9), dict(min_new_tokens=30)],
    ids=["min_new_tokens", "min_length", "default-max-length"],
)
def test_unfeasible_length_warnings_are_transformers_words(kwargs):
    """Issue 11 item 12: the drop-in gives HF's warnings (text for text)."""
    hf = hf_gpt2()
    expected = _hf_warnings(hf, **kwargs)
    assert expected, "transformers warns here"
    fast = fastgpt.accelerate(hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.generate(torch.tensor([[1, 2, 3]]), do_sample=False, pad_token_id=0, **kwargs)
    assert sorted(str(w.message) for w in caught if "Unfeasible" in str(w.message)) == expected


def test_native_generate_warns_when_min_new_tokens_exceeds_max_new_tokens():
    _, model = pair()
    with pytest.warns(UserWarning, match=r"Unfeasible length constraints: `min_new_tokens` \(6\)"):
        model.generate(torch.tensor([[1, 2, 3]]), 4, min_new_tokens=6, eos_token_id=5)


def test_from_generation_config_resolves_like_transformers():
    gc = GenerationConfig(max_new_tokens=7, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, eos_token_id=[3, 4])
    s = GenerationSettings.from_generation_config(gc, CONFIG, 5, has_default_max_length=False)
    assert s.max_new_tokens == 7 and not s.greedy
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (1.0, 0, 1.0, 0.0)  # inactive warpers
    assert s.eos_token_ids == (3, 4) and s.pad_token_id == 3
    gc = GenerationConfig(max_length=20, min_length=9)
    s = GenerationSettings.from_generation_config(gc, CONFIG, 5, has_default_max_length=True)
    assert s.max_new_tokens == 20 and s.min_new_tokens == 4  # default max_length counts new tokens
    with pytest.raises(ValueError, match="max_length"):
        GenerationSettings.from_generation_config(GenerationConfig(max_length=5), CONFIG, 5, has_default_max_length=False)
