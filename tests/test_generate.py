"""generate() against transformers' generate: greedy, left padding, EOS/pad, sampling, bad input."""

import pytest
import torch

from fastgpt import kernels_report, reset_kernels_report
from tests.models import pair


def hf_greedy(hf, ids, n, **kwargs):
    kwargs.setdefault("pad_token_id", 0)
    return hf.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)


@pytest.mark.parametrize("name, prompt_len, n_new", [("tiny-503", 1, 30), ("odd-1001", 13, 40), ("v50257-d256", 16, 20)])
def test_greedy_matches_transformers_single_prompt(name, prompt_len, n_new):
    hf, model = pair(name)
    ids = torch.randint(0, hf.config.vocab_size, (1, prompt_len))
    expected = hf_greedy(hf, ids, n_new)
    reset_kernels_report()
    got = model.generate(ids, n_new)
    assert torch.equal(got, expected)
    assert kernels_report()["sample"] == "torch:greedy"
    assert len(set(got[0, prompt_len:].tolist())) > 3  # the comparison is not between two constant runs


def left_padded_batch(vocab, lengths, pad_id):
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(1, vocab, (n,))
        mask[b, T - n :] = 1
    return ids, mask


def test_greedy_left_padded_batch_matches_transformers_and_rows_alone():
    hf, model = pair("odd-1001")
    ids, mask = left_padded_batch(1001, [9, 4, 1, 7], pad_id=5)
    expected = hf_greedy(hf, ids, 25, attention_mask=mask, pad_token_id=5)
    got = model.generate(ids, 25, attention_mask=mask, pad_token_id=5)
    assert torch.equal(got, expected)
    for b in range(ids.shape[0]):
        start = int((mask[b] == 0).sum())
        alone = model.generate(ids[b : b + 1, start:], 25)
        assert torch.equal(alone[0], got[b, start:])


@pytest.mark.parametrize("eos_as_list", [False, True])
def test_eos_and_pad_match_transformers(eos_as_list):
    hf, model = pair("tiny-503")
    ids, mask = left_padded_batch(503, [6, 3, 8], pad_id=1)
    free_run = hf_greedy(hf, ids, 30, attention_mask=mask, pad_token_id=1)
    T = ids.shape[1]
    # An EOS id that row 0 emits early; other rows may never emit it.
    eos = int(free_run[0, T + 3])
    eos_arg = [eos, 502] if eos_as_list else eos
    expected = hf_greedy(hf, ids, 30, attention_mask=mask, pad_token_id=1, eos_token_id=eos_arg)
    got = model.generate(ids, 30, attention_mask=mask, pad_token_id=1, eos_token_id=eos_arg)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert (got[0, T + 4 :] == 1).all() or got.shape[1] == T + 4


def test_generation_stops_when_every_row_finished():
    hf, model = pair("tiny-503")
    ids = torch.randint(0, 503, (1, 5))
    free_run = hf_greedy(hf, ids, 20)
    eos = int(free_run[0, 5 + 2])
    first = free_run[0, 5:].tolist().index(eos)
    got = model.generate(ids, 20, eos_token_id=eos)
    assert got.shape[1] == 5 + first + 1
    assert torch.equal(got, hf_greedy(hf, ids, 20, eos_token_id=eos))


def test_min_new_tokens_matches_transformers():
    hf, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 4))
    free_run = hf_greedy(hf, ids, 12)
    eos = int(free_run[0, 4 + 1])
    expected = hf_greedy(hf, ids, 12, eos_token_id=eos, min_new_tokens=6)
    got = model.generate(ids, 12, eos_token_id=eos, pad_token_id=0, min_new_tokens=6)
    assert torch.equal(got, expected)
    assert eos not in got[:, 4:10].tolist()[0]


def test_do_sample_false_ignores_temperature_and_temperature_zero_is_greedy():
    _, model = pair()
    ids = torch.randint(0, 503, (1, 5))
    greedy = model.generate(ids, 10)
    assert torch.equal(model.generate(ids, 10, temperature=0.3), greedy)
    assert torch.equal(model.generate(ids, 10, do_sample=True, temperature=0.0, seed=3), greedy)


def test_top_k_one_sampling_equals_greedy():
    _, model = pair()
    ids = torch.randint(0, 503, (2, 5))
    assert torch.equal(model.generate(ids, 15, do_sample=True, top_k=1, seed=7), model.generate(ids, 15))


def test_same_seed_same_tokens_different_seed_different_tokens():
    _, model = pair()
    ids = torch.randint(0, 503, (2, 5))
    a = model.generate(ids, 30, do_sample=True, temperature=1.5, seed=11)
    b = model.generate(ids, 30, do_sample=True, temperature=1.5, seed=11)
    c = model.generate(ids, 30, do_sample=True, temperature=1.5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampled_tokens_stay_inside_top_k_and_top_p_sets():
    from fastgpt import reference

    _, model = pair()
    ids = torch.randint(0, 503, (1, 6))
    for seed in range(20):
        out = model.generate(ids, 1, do_sample=True, top_k=5, top_p=0.5, temperature=1.3, seed=seed)
        with torch.no_grad():
            logits = model(ids)[:, -1]
        kept = reference.filter_logits(logits, 1.3, 5, 0.5) > float("-inf")
        assert kept[0, out[0, -1]]


def test_first_sampled_token_frequencies_match_distribution():
    """Chi-square over 4000 first tokens of a batch of identical prompts (fixed seed)."""
    from tests.stats import chisquare_pvalue

    from fastgpt import reference

    _, model = pair()
    prompt = torch.randint(0, 503, (1, 6))
    ids = prompt.expand(4000, 6).contiguous()
    out = model.generate(ids, 1, do_sample=True, temperature=0.7, top_k=12, seed=2024)
    with torch.no_grad():
        probs = reference.sampling_probs(model(prompt)[:, -1], 0.7, 12)[0]
    counts = torch.bincount(out[:, -1], minlength=503).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * 4000
    assert chisquare_pvalue(counts[support], expected) > 1e-3


BAD_CALLS = [
    (dict(max_new_tokens=60), ValueError, "n_positions"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(top_k=0, do_sample=True), ValueError, "top_k"),
    (dict(top_p=0.0, do_sample=True), ValueError, "top_p"),
    (dict(top_p=1.5, do_sample=True), ValueError, "top_p"),
    (dict(temperature=-1.0, do_sample=True), ValueError, "temperature"),
    (dict(min_p=2.0, do_sample=True), ValueError, "min_p"),
    (dict(eos_token_id=503), ValueError, "eos_token_id"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(attention_mask=torch.ones(1, 4)), ValueError, "attention_mask must have the shape"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 1, 1]])), ValueError, "left-padded"),
    (dict(attention_mask=torch.zeros(1, 5)), ValueError, "no real token"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CALLS)
def test_bad_arguments_raise_before_any_work(kwargs, error, match):
    _, model = pair()  # n_positions 64
    kwargs = dict(kwargs)
    n = kwargs.pop("max_new_tokens", 5)
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, 503, (1, 5)), n, **kwargs)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one token"),
        (torch.zeros(1, 3), TypeError, "integer dtype"),
        (torch.tensor([[1, 503]]), ValueError, r"\[0, 502\]"),
        (torch.tensor([[-1, 2]]), ValueError, r"\[0, 502\]"),
        ([1, 2, 3], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_ids_raise(ids, error, match):
    _, model = pair()
    with pytest.raises(error, match=match):
        model.generate(ids, 3)
