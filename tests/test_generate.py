"""generate() against transformers' generate: greedy, left padding, EOS/pad, sampling, bad input."""

import pytest
import torch

from fastgpt import GPT, GPTConfig, kernels_report, reset_kernels_report
from tests.helpers import left_padded
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


def test_greedy_left_padded_batch_matches_transformers_and_rows_alone():
    hf, model = pair("odd-1001")
    ids, mask = left_padded(1001, [9, 4, 1, 7], pad_id=5)
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
    ids, mask = left_padded(503, [6, 3, 8], pad_id=1)
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


# ============================================================================================
# Issue 11: drop-in fidelity
# ============================================================================================
def repetition_repro(model):
    """Issue 11 item 1's batch: row 0 is [1, 2] left-padded with the EOS id (= pad id), which the
    unpadded row emits as its 4th new token."""
    eos = int(model.generate(torch.tensor([[1, 2]]), 6, repetition_penalty=3.0)[0, 2 + 3])
    ids = torch.tensor([[eos, eos, eos, eos, 1, 2], [4, 5, 6, 3, 1, 2]])
    return ids, (ids != eos).long(), eos


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, top_k=1, seed=0)], ids=["greedy", "sampling"])
def test_repetition_penalty_does_not_penalise_left_pad_slots(sampling):
    hf, model = pair("tiny-503")
    ids, mask, eos = repetition_repro(model)
    kwargs = dict(repetition_penalty=3.0, eos_token_id=eos, pad_token_id=eos)
    got = model.generate(ids, 10, attention_mask=mask, **sampling, **kwargs)
    alone = hf.generate(ids[:1, 4:], max_new_tokens=10, do_sample=False, **kwargs)  # the row without pads
    assert alone.shape[1] == 2 + 4  # it ends at step 4 (its EOS)
    assert torch.equal(got[0, 4 : 4 + alone.shape[1]], alone[0])
    assert (got[0, 4 + alone.shape[1] :] == eos).all()


def tiny_vocab_model(vocab=13):
    return GPT.from_config(GPTConfig(vocab_size=vocab, n_positions=40, n_embd=16, n_head=2, n_layer=1), seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("streaming", [False, True], ids=["fast-loop", "streaming-loop"])
def test_sampling_when_every_token_is_banned_raises_like_transformers(monkeypatch, streaming, backend):
    """Issue 11 item 6: never a banned token; the all-banned row is reported (C1 status), by the
    PyTorch sampler and by the Triton one (interpreter on a CPU)."""
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    reset_kernels_report()
    model = tiny_vocab_model()
    extra = dict(output_scores=True, return_dict_in_generate=True) if streaming else {}
    with pytest.raises(RuntimeError, match=r"sampling failed in row 0 at step 12: every token is banned"):
        model.generate(torch.tensor([[0]]), 20, do_sample=True, no_repeat_ngram_size=1, seed=1, **extra)
    assert kernels_report()["sample"] == ("triton" if backend == "triton" else "torch")
    ok = model.generate(torch.tensor([[0]]), 12, do_sample=True, no_repeat_ngram_size=1, seed=1)
    assert sorted(ok[0].tolist()) == list(range(13))  # 13 distinct tokens, then nothing is left


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_scores_when_sampling_raise_and_greedy_follows_argmax(monkeypatch, backend):
    """Issue 11 item 5 (the sampler side): NaN scores are a clear RuntimeError, never token 0."""
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    reset_kernels_report()
    model = tiny_vocab_model(29)
    # Row 1's hidden states (hence its logits) become NaN, row 0's stay finite.
    nan_row_1 = lambda module, args, out: (out[0].index_fill(0, torch.tensor([1]), float("nan")), out[1])  # noqa: E731
    model.h[-1].register_forward_hook(nan_row_1)  # the last block returns (stream, pending delta)
    with pytest.raises(RuntimeError, match=r"sampling failed in row 1 at step 0: the scores contain NaN \(HF raises"):
        model.generate(torch.tensor([[1, 2], [3, 4]]), 5, do_sample=True, seed=0)
    greedy = model.generate(torch.tensor([[1, 2], [3, 4]]), 3)  # greedy: torch.argmax semantics, no error
    assert greedy[1, 2:].tolist() == [0, 0, 0]  # argmax of all-NaN logits: the first index
    assert kernels_report()["sample"] == ("triton" if backend == "triton" else "torch:greedy")


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(do_sample=True, seed=1), dict(num_beams=2), dict(output_scores=True, output_logits=True)],
    ids=["greedy", "sampling", "beam", "scores"],
)
def test_returned_tensors_are_ordinary_tensors(kwargs):
    """Issue 11 item 7: users may modify outputs in place and train on them, as with HF."""
    hf, model = pair("tiny-503")
    ids = torch.randint(1, 503, (2, 4))
    out = model.generate(ids, 5, return_dict_in_generate=True, **kwargs)
    tensors = [out.sequences] + list(out.scores or ()) + list(out.logits or ())
    assert all(not t.is_inference() and not t.requires_grad for t in tensors)
    out.sequences[out.sequences == 0] = 1  # raised "Inplace update to inference tensor" before
    loss = hf(out.sequences, labels=out.sequences).loss
    loss.backward()  # raised "Inference tensors cannot be saved for backward" before
    plain = model.generate(ids, 5)
    plain += 1
