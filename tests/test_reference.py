"""The PyTorch reference ops (the oracle of every kernel test) against independent definitions:
Hugging Face's logits warpers for sampling, a naive float64 softmax for attention."""

import math

import pytest
import torch
from tests.stats import chisquare_pvalue
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastgpt import reference


def hf_filtered(logits, temperature, top_k, top_p, min_p):
    scores = logits.clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (0.8, 40, 0.6, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 20, 0.95, 0.05)],
)
def test_filter_logits_keeps_the_same_set_as_hf_warpers(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    ours = reference.filter_logits(logits, temperature, top_k, top_p, min_p)
    theirs = hf_filtered(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > float("-inf"), theirs > float("-inf"))
    kept = ours > float("-inf")
    assert torch.allclose(ours[kept], theirs[kept])


def test_filter_logits_per_row_settings_and_greedy_rows():
    torch.manual_seed(1)
    logits = torch.randn(3, 200)
    logits[0, 17] = logits[0, 99] = logits[0].max() + 1  # tie: argmax is the lower index
    out = reference.filter_logits(
        logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.3]), 0.0
    )
    assert (out[0] > float("-inf")).nonzero().flatten().tolist() == [17]
    assert (out[1] > float("-inf")).sum() == 5
    for b, (k, p) in enumerate([(0, 1.0), (5, 1.0), (0, 0.3)]):
        if b:
            expected = hf_filtered(logits[b : b + 1], 1.0, k, p, 0.0)
            assert torch.equal(out[b : b + 1] > float("-inf"), expected > float("-inf"))


def test_top_k_keeps_ties_at_the_boundary_like_hf():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    kept = reference.filter_logits(logits, 1.0, 2) > float("-inf")
    assert kept.tolist() == [[True, True, True, True, False]]


def test_nucleus_boundary_is_exclusive_prefix_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # mass before token 2 is 0.8: kept for top_p 0.81, dropped for top_p 0.79
    assert (reference.filter_logits(logits, 1.0, 0, 0.81) > float("-inf")).sum() == 3
    assert (reference.filter_logits(logits, 1.0, 0, 0.79) > float("-inf")).sum() == 2
    assert (reference.filter_logits(logits, 1.0, 0, 0.5) > float("-inf")).sum() == 1
    assert (reference.filter_logits(logits, 1.0, 0, 0.51) > float("-inf")).sum() == 2


def test_sample_frequencies_match_sampling_probs_chi_square():
    torch.manual_seed(3)
    logits = torch.randn(1, 40) * 2
    n = 20000
    gen = torch.Generator().manual_seed(99)
    draws = reference.sample(logits.expand(n, 40), 0.8, 10, 0.9, 0.0, generator=gen)
    probs = reference.sampling_probs(logits, 0.8, 10, 0.9)[0]
    counts = torch.bincount(draws, minlength=40).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    assert chisquare_pvalue(counts[support], (probs[support] * n)) > 1e-3
    # Power: the same draws against a 10%-off temperature fail the test.
    wrong = reference.sampling_probs(logits, 0.88, 10, 0.9)[0]
    assert chisquare_pvalue(counts[support], (wrong[support] * n)) < 1e-6


def naive_attention(q, k, v, row_start):
    """float64 softmax(q k^T / sqrt(D)) v, causal, slots before row_start masked: the textbook form."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            if i < row_start[b]:
                continue
            keys = slice(int(row_start[b]), i + 1)
            scores = torch.einsum("hd,jhd->hj", q[b, i].double(), k[b, keys].double()) / math.sqrt(D)
            out[b, i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[b, keys].double())
    return out


@pytest.mark.parametrize("row_start", [[0, 0], [0, 3]])
def test_attention_reference_prefill_then_decode(row_start):
    torch.manual_seed(4)
    B, T, H, D, S = 2, 9, 3, 8, 12
    q, k, v = (torch.randn(B, T + 2, H, D, dtype=torch.float64) for _ in range(3))
    rs = torch.tensor(row_start, dtype=torch.int32)
    kc = torch.full((B, H, S, D), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    outs = [reference.attention(q[:, :T], k[:, :T], v[:, :T], kc, vc, 0, rs if any(row_start) else None)]
    for t in (T, T + 1):
        outs.append(reference.attention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], kc, vc, t, rs if any(row_start) else None))
    got = torch.cat(outs, dim=1)
    assert torch.allclose(got, naive_attention(q, k, v, row_start), atol=1e-12)
    assert torch.equal(kc[:, :, : T + 2], k.transpose(1, 2))


def test_topk_reference_ties_and_nan_order():
    x = torch.tensor([[1.0, float("nan"), 3.0, 3.0, float("inf"), float("-inf"), float("nan")]])
    values, indices = reference.topk(x, 5)
    assert indices.tolist() == [[1, 6, 4, 2, 3]]
    assert values[0, 2:].tolist() == [float("inf"), 3.0, 3.0]


@pytest.mark.parametrize("row_start", [[0, 0], [2, 0]])
def test_attention_at_device_position_equals_host_position(row_start):
    torch.manual_seed(5)
    B, T, H, D, S = 2, 6, 2, 8, 10
    q, k, v = (torch.randn(B, T + 2, H, D, dtype=torch.float64) for _ in range(3))
    rs = torch.tensor(row_start, dtype=torch.int32)
    host = [torch.zeros(B, H, S, D, dtype=torch.float64) for _ in range(2)]
    dev = [torch.zeros(B, H, S, D, dtype=torch.float64) for _ in range(2)]
    for start, stop in [(0, T), (T, T + 1), (T + 1, T + 2)]:
        sl = slice(start, stop)
        want = reference.attention(q[:, sl], k[:, sl], v[:, sl], *host, start, rs)
        got = reference.attention_at(q[:, sl], k[:, sl], v[:, sl], *dev, torch.tensor([start]), rs)
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.equal(dev[0], host[0]) and torch.equal(dev[1], host[1])
