"""Tests of the fused Triton sampler (kernels/sampling.py) against fastgpt.reference.

The central identity: ``sample`` returns ``argmax_{i in K} x_i + noise[b, i]`` where ``K`` is the
kept set of ``reference.filter_logits`` and ``noise = gumbel_noise(...)`` is the sampler's own
counter-based Gumbel noise. ``test_matches_recomputed_race*`` checks that identity token for token
on every path (greedy, keep-all, candidate union, the exact fallback searches, tie splits), which
covers both the kept set and the draw; the chi-square tests check that the noise makes the race
draw from ``reference.sampling_probs`` (and that a 10% temperature error or a nucleus one token
off would be caught). On the CPU the kernels run in the Triton interpreter (~0.5 ms per op), so
CPU cases are small and the chi-square draws come from the noise kernel; the CUDA tests draw
through ``sample`` itself with large batches and vocabularies.

Float rounding: masses are float32 sums in different orders in the kernel and the reference, so a
top-p / min-p decision within ~1e-5 of its threshold can go either way. Small cases use inputs with
no such decision (``_unambiguous_logits``), so the check is exact; large vocabularies always have
some, so ``_check_race`` accepts the race winner of any kept prefix between the shortest and the
longest that rounding allows (the kept set is always a prefix of the (value desc, index asc)
order) -- a single token for every row without an ambiguous decision.

The kernels also run with the real GPU block sizes on the CPU (``test_gpu_configurations``): the
interpreter's cost is per op, not per element.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from fastgpt import reference
from fastgpt.kernels import sampling as S
from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES, launch_record

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ON_CPU = not HAS_CUDA


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _settings(B, T=1.0, k=0, p=1.0, m=0.0, device=DEV):
    """(temperature, top_k, top_p, min_p) as (B,) tensors from scalars or per-row lists."""

    def row(v, dtype):
        t = torch.as_tensor(v, dtype=dtype)
        return (t.expand(B) if t.dim() == 0 else t).contiguous().to(device)

    return row(T, torch.float32), row(k, torch.int32), row(p, torch.float32), row(m, torch.float32)


def _seed_step(seed, step, device=DEV, step_dtype=torch.int64):
    return torch.tensor([seed], dtype=torch.int64, device=device), torch.tensor([step], dtype=step_dtype, device=device)


def _run(logits, settings, seed=1234, step=0, *, config=None, workspace=None, out=None, step_dtype=torch.int64):
    """Call sample and assert it launched the Triton kernels; returns (tokens, path bits)."""
    B, V = logits.shape
    ws = workspace if workspace is not None else S.sampling_workspace(B, V, logits.device, config=config)
    ws["path"].fill_(-1)  # poison: every row must record its path
    seed_t, step_t = _seed_step(seed, step, logits.device, step_dtype)
    calls = launch_record().get("sample", {}).get("calls", 0)
    tokens = S.sample(logits, *settings, seed_t, step_t, workspace=ws, out=out)
    ran = launch_record()["sample"]
    assert ran["calls"] == calls + 1 and ran["launches"] == 2
    assert ran["impl"] == "triton" and ran["interpreter"] == ON_CPU
    path = ws["path"][:B].cpu()
    assert (path > 0).all(), f"rows without a recorded path: {path.tolist()}"
    return tokens, path


def _expected_race(logits, settings, seed=1234, step=0, step_dtype=torch.int64):
    """argmax over the reference kept set of scaled logits + the sampler's Gumbel noise."""
    B, V = logits.shape
    f = reference.filter_logits(logits, *settings)  # (B, V) float32, -inf outside the kept set
    seed_t, step_t = _seed_step(seed, step, logits.device, step_dtype)
    noise = S.gumbel_noise(B, V, seed_t, step_t)
    return (f + noise).argmax(dim=-1), torch.isfinite(f)


_MARGIN = 1e-5  # float32 sums of up to 256k terms err by ~1e-6; decisions closer are ambiguous


def _prefix_bounds(logits, settings):
    """Per row: (order, L_strict, L_loose). The kept set is always a prefix of ``order`` (value
    descending, index ascending): top-k, the top-p cut and the min-p threshold each keep one.
    ``order[:L]`` is what float64 arithmetic keeps for any L in [L_strict, L_loose]; L_strict <
    L_loose only when some top-p / min-p decision lies within ``_MARGIN`` of its threshold."""
    T, K, P, Mp = settings
    B, V = logits.shape
    out = []
    for b in range(B):
        if T[b] == 0:
            out.append((logits[b].float().argmax().reshape(1), 1, 1))
            continue
        x = logits[b].float() / T[b]  # float32 IEEE division, as the kernel and the reference
        xs, order = torch.sort(x, descending=True, stable=True)
        k = int(K[b])
        in_k = xs >= xs[(V if k <= 0 or k > V else k) - 1]
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        e = torch.where(in_k & torch.isfinite(xs), torch.exp(xs.double() - xs[0].double()), zero)
        keep, unsure = in_k.clone(), torch.zeros_like(in_k)
        top_p, min_p = float(P[b]), float(Mp[b])
        if top_p < 1:
            prob = e / e.sum()
            before = torch.cumsum(prob, 0) - prob
            keep &= before < top_p
            unsure |= (before - top_p).abs() < _MARGIN
        if min_p > 0:
            keep &= e >= min_p
            unsure |= (e - min_p).abs() < _MARGIN * min_p
        keep[0], unsure[0] = True, False  # the top token is always kept
        unsure &= in_k
        sure = keep & ~unsure
        l_strict = int(sure.int().cumprod(0).sum())  # leading surely-kept positions
        maybe = (keep | unsure).int().cumprod(0)
        out.append((order, l_strict, int(maybe.sum())))
    return out


def _check_race(tokens, logits, settings, seed=1234, step=0, step_dtype=torch.int64):
    """Assert each token is the race winner over a kept prefix allowed by float rounding (exactly
    the reference's when unambiguous). Returns the number of rows with an ambiguous boundary."""
    B, V = logits.shape
    seed_t, step_t = _seed_step(seed, step, logits.device, step_dtype)
    noise = S.gumbel_noise(B, V, seed_t, step_t)
    ref_kept = torch.isfinite(reference.filter_logits(logits, *settings)).sum(-1).tolist()
    ambiguous = 0
    for b, (order, l_strict, l_loose) in enumerate(_prefix_bounds(logits, settings)):
        if settings[0][b] == 0:
            assert int(tokens[b]) == int(order[0]), f"row {b}: greedy"
            continue
        assert l_strict <= ref_kept[b] <= l_loose, f"row {b}: reference keeps {ref_kept[b]} not in [{l_strict}, {l_loose}]"
        scores = (logits[b].float() / settings[0][b] + noise[b])[order[:l_loose]]
        winners = order[:l_loose][torch.cummax(scores, 0).indices]  # winner of each prefix
        allowed = set(winners[max(l_strict, 1) - 1:].tolist())
        ambiguous += l_strict < l_loose
        assert int(tokens[b]) in allowed, f"row {b}: token {int(tokens[b])}, allowed {sorted(allowed)[:8]}"
    return ambiguous


def _margins(logits, settings):
    """(kept mask, unambiguous) from :func:`_prefix_bounds` (used to pick unambiguous inputs)."""
    B, V = logits.shape
    kept = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    unambiguous = True
    for b, (order, l_strict, l_loose) in enumerate(_prefix_bounds(logits, settings)):
        kept[b, order[:l_strict]] = True
        unambiguous &= l_strict == l_loose
    return kept, unambiguous


def _logits(shape, *, dtype=torch.float32, scale=2.0, seed=0, levels=None, neg_inf=0):
    """Deterministic random logits on DEV; ``levels``: that many distinct values (ties);
    ``neg_inf``: that many -inf per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if levels is not None:
        x = torch.floor(x / (3 * scale) * levels / 2) / levels * 4
    if neg_inf:
        for b in range(shape[0]):
            x[b, torch.randperm(shape[1], generator=g)[:neg_inf]] = float("-inf")
    return x.to(dtype).to(DEV)


def _unambiguous_logits(shape, settings, *, seed=0, **kw):
    """:func:`_logits` whose kept set no float rounding can change (small vocabularies)."""
    for attempt in range(50):
        x = _logits(shape, seed=1000 * seed + attempt, **kw)
        kept64, unambiguous = _margins(x, settings)
        if unambiguous and torch.equal(kept64, torch.isfinite(reference.filter_logits(x, *settings))):
            return x
    raise AssertionError("could not draw unambiguous logits; change the case")


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value, merging the smallest-expectation bins until each has >= 5."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) * counts.sum()
    order = np.argsort(expected)
    obs_bins, exp_bins = [], []
    acc_o = acc_e = 0.0
    for i in order:
        acc_o += counts[i]
        acc_e += expected[i]
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    if exp_bins:
        obs_bins[-1] += acc_o
        exp_bins[-1] += acc_e
    else:
        return 1.0
    if len(exp_bins) < 2:
        return 1.0
    exp_bins = np.array(exp_bins) * (sum(obs_bins) / sum(exp_bins))  # remove float drift
    return float(stats.chisquare(obs_bins, exp_bins).pvalue)


# --------------------------------------------------------------------------------------------
# Exactness: every path returns the recomputed race
# --------------------------------------------------------------------------------------------
_CFG = S.interpreter_config
# (id, V, dtype, row settings (T, k, p, m), logits kwargs, config factory or None, bits that must show)
_CPU_CASES = [
    ("keep_all", 111, torch.float32, ([1.0, 0.7, 1.6], 0, 1.0, 0.0), {}, None, S.PATH_KEEP_ALL),
    ("keep_all_k_eq_V", 33, torch.float16, (0.9, [33, 40], 1.0, 0.0), {}, None, S.PATH_KEEP_ALL),
    ("topk_head", 1000, torch.float32, (0.8, [3, 7], 1.0, 0.0), {}, None, S.PATH_HEAD),
    ("topk_union", 1000, torch.float32, (0.8, 12, 1.0, 0.0), {}, None, S.PATH_UNION | S.PATH_SMALL_DRAW),
    ("topk_row", 1000, torch.float32, (1.0, 200, 1.0, 0.0), {}, None, S.PATH_FALLBACK | S.PATH_ROW_TOPK),
    ("topp_head", 1000, torch.float32, (1.0, 0, [0.3, 0.6], 0.0), {"scale": 5.0}, None, S.PATH_HEAD),
    ("topp_union", 1000, torch.float32, (1.0, 0, 0.5, 0.0), {"scale": 2.0}, lambda V: _CFG(V, head=4),
     S.PATH_UNION),
    ("topp_row", 1000, torch.bfloat16, (1.0, 0, 0.9, 0.0), {"scale": 1.0}, None,
     S.PATH_FALLBACK | S.PATH_ROW_TOPP | S.PATH_ROW_COMPACT),
    ("minp_head", 1000, torch.float32, (1.0, 0, 1.0, 0.2), {"scale": 3.0}, None, S.PATH_HEAD),
    ("minp_union", 1000, torch.float32, (1.0, 0, 1.0, 0.02), {"scale": 3.0}, lambda V: _CFG(V, head=4), S.PATH_UNION),
    ("minp_row", 1000, torch.float16, (1.0, 0, 1.0, 0.05), {"scale": 1.0}, None, S.PATH_FALLBACK),
    ("combo", 1000, torch.float32, (0.7, 40, 0.8, 0.02), {"scale": 2.0}, None, 0),
    ("union_wide_draw", 111, torch.float32, (1.3, 0, 0.97, 0.0), {"scale": 0.5}, lambda V: _CFG(V, cands=64, tiles=4),
     S.PATH_UNION),
    ("neg_inf_tokens", 300, torch.float32, ([1.0, 0.8], [0, 10], [0.9, 1.0], [0.0, 0.01]), {"neg_inf": 40}, None, 0),
    ("tiny_vocab", 7, torch.bfloat16, ([0.0, 1.0, 1.0, 2.0], [0, 2, 0, 0], [1.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.3]),
     {}, None, S.PATH_GREEDY | S.PATH_HEAD),
    ("mixed_rows", 700, torch.float32,
     ([0.0, 1.0, 0.9, 1.1, 1.0, 0.6], [0, 0, 5, 0, 0, 30], [1.0, 1.0, 1.0, 0.75, 1.0, 0.9], [0.0, 0.0, 0.0, 0.0, 0.1, 0.05]),
     {"scale": 3.0}, None, S.PATH_GREEDY | S.PATH_KEEP_ALL | S.PATH_HEAD),
    # Ties (bf16-like logits): top-k keeps the whole boundary group; top-p splits a group by index.
    ("topk_ties", 500, torch.float32, (1.0, 25, 1.0, 0.0), {"levels": 12}, None, 0),
    ("topk_ties_union", 111, torch.float32, (1.0, 9, 1.0, 0.0), {"levels": 10}, lambda V: _CFG(V, cands=64, tiles=4),
     S.PATH_UNION),
]


@pytest.mark.parametrize("case", _CPU_CASES, ids=[c[0] for c in _CPU_CASES])
def test_matches_recomputed_race(case):
    name, V, dtype, (T, k, p, m), lkw, cfg, bits = case
    B = max(len(v) if isinstance(v, list) else 1 for v in (T, k, p, m))
    settings = _settings(B, T, k, p, m)
    logits = _unambiguous_logits((B, V), settings, dtype=dtype, seed=zlib.crc32(name.encode()) % 1000, **lkw)
    config = cfg(V) if cfg is not None and ON_CPU else None
    # One step per case on the CPU (the interpreter is slow); several on the GPU.
    for step in (zlib.crc32(name.encode()) % 5,) if ON_CPU else (0, 1, 2**32 + 3):
        tokens, path = _run(logits, settings, seed=77, step=step, config=config)
        expected, kept = _expected_race(logits, settings, seed=77, step=step)
        assert tokens.dtype == torch.int64 and tokens.shape == (B,)
        assert kept[torch.arange(B, device=DEV), tokens].all(), "drew a token outside the kept set"
        assert torch.equal(tokens, expected), f"paths {path.tolist()}"
    if ON_CPU:
        seen = int(np.bitwise_or.reduce(path.numpy()))
        assert seen & bits == bits, f"expected path bits {bits:#x}, rows took {path.tolist()}"


def _tie_split_case(V, levels, seed, group_min, group_max=None, min_start=1):
    """Logits with tie groups and a top_p that cuts a group between two of its members."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (1, V), generator=g).float() * 0.25).to(torch.bfloat16)
    xs, _ = torch.sort(x[0].float(), descending=True, stable=True)
    prob = torch.softmax(xs.double(), 0)
    before = torch.cumsum(prob, 0) - prob
    values, counts = torch.unique_consecutive(xs, return_counts=True)
    start = 0
    for v, c in zip(values.tolist(), counts.tolist()):
        if c >= group_min and (group_max is None or c <= group_max) and start >= min_start:
            j = start + c // 2  # cut between members c//2 - 1 and c//2 of this group
            top_p = float(before[j] - 0.5 * prob[j])
            return x.to(DEV), top_p
        start += c
    raise AssertionError("no suitable tie group")


@pytest.mark.parametrize(
    "variant",
    ["head", "union", "row_compact", "row_ties"],
)
def test_top_p_splits_tie_group_by_index(variant):
    if variant == "head":  # the pairwise fast path orders the tied tokens by index
        V, levels, cfg, gmin, gmax, start, bits = 40, 8, (lambda V: _CFG(V, head=16)), 3, None, 1, S.PATH_HEAD
    elif variant == "union":  # a complete union: the group is split in registers
        V, levels, cfg, gmin, gmax, start, bits = 111, 8, (lambda V: _CFG(V, cands=64, tiles=4)), 3, None, 1, S.PATH_UNION
    elif variant == "row_compact":  # fallback; the cut's group fits the CAP gathered tokens
        V, levels, cfg, gmin, gmax, start, bits = 1000, 60, None, 4, 40, 300, S.PATH_FALLBACK | S.PATH_ROW_COMPACT
    else:  # fallback; a group of more than CAP ties is split by an index search over the row
        V, levels, cfg, gmin, gmax, start, bits = 1000, 4, None, 100, None, 1, S.PATH_FALLBACK | S.PATH_TIE_ROW
    logits, top_p = _tie_split_case(V, levels, seed=5, group_min=gmin, group_max=gmax, min_start=start)
    settings = _settings(1, 1.0, 0, top_p, 0.0)
    kept64, unambiguous = _margins(logits, settings)
    assert unambiguous and torch.equal(kept64, torch.isfinite(reference.filter_logits(logits, *settings)))
    config = cfg(V) if cfg is not None and ON_CPU else None
    tokens, path = _run(logits, settings, seed=3, step=9, config=config)
    expected, kept = _expected_race(logits, settings, seed=3, step=9)
    assert torch.equal(tokens, expected)
    if ON_CPU:
        split = 0 if variant == "head" else S.PATH_TIE_SPLIT  # (the head needs no index search)
        assert int(path[0]) & (bits | split) == bits | split, path.tolist()


def test_masked_vocabulary_stays_on_the_fast_paths():
    """Constrained decoding: most tokens -inf. Chunks with few finite tokens must stay complete."""
    V = 1000
    settings = _settings(4, [1.0, 0.8, 1.0, 1.2], [0, 5, 0, 0], [0.9, 1.0, 1.0, 0.7], [0.0, 0.0, 0.05, 0.0])
    logits = _unambiguous_logits((4, V), settings, seed=12, neg_inf=V - 30)
    tokens, path = _run(logits, settings, seed=2, step=2)
    expected, _ = _expected_race(logits, settings, seed=2, step=2)
    assert torch.equal(tokens, expected)
    assert not (path & S.PATH_FALLBACK).any(), path.tolist()


def _gpu_config(V):
    return next(cfg for limit, cfg in S._GPU_CONFIGS if V <= limit)


_GPU_CFG_CASES = [
    # (id, V, row settings (T, k, p, m), logits kwargs, path bits that must show)
    ("tier1_fast", 50257, ([0.0, 1.0, 0.8, 1.0], [0, 0, 50, 0], [1.0, 1.0, 0.9, 0.9], 0.0), {"scale": 4.0},
     S.PATH_GREEDY | S.PATH_KEEP_ALL | S.PATH_HEAD),
    ("tier1_union", 50257, (1.0, 0, [0.9, 0.8], [0.0, 0.01]), {"scale": 3.0}, S.PATH_UNION),
    ("tier1_fallback", 50257, (1.0, 5000, 0.9, 0.0), {"scale": 1.0},
     S.PATH_FALLBACK | S.PATH_ROW_TOPP | S.PATH_ROW_TOPK),
    ("tier2", 128256, ([0.8, 1.0], [50, 0], [0.9, 0.95], [0.0, 0.02]), {"scale": 4.0}, S.PATH_HEAD | S.PATH_UNION),
]


@pytest.mark.parametrize("case", _GPU_CFG_CASES, ids=[c[0] for c in _GPU_CFG_CASES])
def test_gpu_configurations(case):
    """The real GPU block sizes (interleaved 128-token tiles, HEAD 64, 2048-token CAP, ...), run
    by the CPU interpreter too: its cost is per op, not per element."""
    name, V, (T, k, p, m), lkw, bits = case
    B = max(len(v) if isinstance(v, list) else 1 for v in (T, k, p, m))
    settings = _settings(B, T, k, p, m)
    logits = _logits((B, V), seed=3, **lkw)
    tokens, path = _run(logits, settings, seed=5, step=1, config=_gpu_config(V))
    _check_race(tokens, logits, settings, seed=5, step=1)
    seen = int(np.bitwise_or.reduce(path.numpy()))
    assert seen & bits == bits, f"expected path bits {bits:#x}, rows took {path.tolist()}"


@pytest.mark.parametrize("variant", ["tie_head", "tie_union"])
def test_gpu_configurations_tie_splits(variant):
    V, levels, gmin, gmax, start, want = _TIE_CASES[variant]
    logits, top_p = _tie_split_case(V, levels, seed=2, group_min=gmin, group_max=gmax, min_start=start)
    settings = _settings(1, 1.0, 0, top_p, 0.0)
    assert _margins(logits, settings)[1]
    tokens, path = _run(logits, settings, seed=8, step=8, config=_gpu_config(V))
    expected, _ = _expected_race(logits, settings, seed=8, step=8)
    assert torch.equal(tokens, expected) and int(path[0]) & want == want, path.tolist()


def test_random_settings_fuzz():
    """Small random cases with random settings and dtypes, all against the recomputed race."""
    g = torch.Generator().manual_seed(11)
    for trial in range(3 if ON_CPU else 40):
        V = int(torch.randint(2, 300 if ON_CPU else 70000, (1,), generator=g))
        B = 3
        T = torch.rand(B, generator=g) * 1.5 + 0.2
        T[0] = 0.0 if trial % 3 == 0 else T[0]
        k = torch.randint(0, V + 3, (B,), generator=g)
        p = torch.where(torch.rand(B, generator=g) < 0.5, torch.rand(B, generator=g) * 0.9 + 0.05, torch.ones(B))
        m = torch.where(torch.rand(B, generator=g) < 0.3, torch.rand(B, generator=g) * 0.2, torch.zeros(B))
        settings = _settings(B, T.tolist(), k.tolist(), p.tolist(), m.tolist())
        dtype = (torch.float32, torch.float16, torch.bfloat16)[trial % 3]
        logits = _logits((B, V), dtype=dtype, seed=trial, scale=float(1 + trial % 3))
        tokens, _ = _run(logits, settings, seed=trial, step=trial)
        _check_race(tokens, logits, settings, seed=trial, step=trial)


# --------------------------------------------------------------------------------------------
# Greedy and degenerate filters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [7, 111, 1000] + ([50257, 128256, 151936] if HAS_CUDA else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_lowest_index_among_ties_across_chunks(V, dtype):
    B = 3
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=g).to(dtype)
    cfg = S.select_config(V)
    chunk_of = lambda i: (i // cfg.tile) % cfg.n_chunks(V)  # noqa: E731
    top = logits.float().max() + 1
    # Row 0: maxima at 0.9V and 0.3V (different chunks when V spans several); row 1: a single max;
    # row 2: all equal (argmax = 0).
    hi_i, lo_i = int(V * 0.9), int(V * 0.3)
    logits[0, hi_i] = top
    logits[0, lo_i] = top
    if V >= 2 * cfg.chunk:
        assert chunk_of(hi_i) != chunk_of(lo_i)
    logits[1, V // 2] = top
    logits[2] = 1.0
    logits = logits.to(DEV)
    settings = _settings(B, 0.0, [0, 5, 0], [1.0, 0.5, 1.0], [0.0, 0.1, 0.0])  # other filters must not matter
    tokens, path = _run(logits, settings)
    assert torch.equal(tokens, reference.greedy(logits.float()))
    assert tokens.tolist() == [min(hi_i, lo_i), V // 2, 0]
    assert (path == S.PATH_GREEDY).all()


def test_degenerate_filters_equal_greedy():
    V = 1000
    settings = _settings(3, [1.0, 0.8, 1.0], [1, 0, 0], [1.0, 1e-6, 1.0], [0.0, 0.0, 1.0])
    logits = _unambiguous_logits((3, V), settings, seed=4)
    for step in range(2):
        tokens, _ = _run(logits, settings, step=step)
        assert torch.equal(tokens, logits.float().argmax(-1))


def test_vocab_of_one_token():
    logits = torch.randn(2, 1, device=DEV)
    tokens, _ = _run(logits, _settings(2, [0.0, 1.0], 0, [1.0, 0.5], 0.0))
    assert tokens.tolist() == [0, 0]


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------
def test_reproducible_and_independent_across_steps_and_rows():
    V, B = 40, 6
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(8)) * 0.5
    logits = row.expand(B, V).contiguous().to(DEV)
    keep_all, top_k = _settings(B), _settings(B, 1.0, 6, 1.0, 0.0)
    t0, _ = _run(logits, keep_all, seed=5, step=3)
    t1, _ = _run(logits, keep_all, seed=5, step=3)
    assert torch.equal(t0, t1), "same (seed, step) must give the same tokens"
    assert len(set(t0.tolist())) > 1, "identical rows at one step must draw independently"
    t2, _ = _run(logits, keep_all, seed=5, step=4)
    t3, _ = _run(logits, keep_all, seed=6, step=3)
    assert not torch.equal(t0, t2), "a new step must give new draws"
    assert not torch.equal(t0, t3), "a new seed must give new draws"
    k0, _ = _run(logits, top_k, seed=5, step=3)
    k1, _ = _run(logits, top_k, seed=5, step=4)
    assert not torch.equal(k0, k1) and len(set(k0.tolist())) > 1


def _race_draws(row_logits, settings, n_draws, seed):
    """n_draws i.i.d. race draws over the reference kept set, with noise from the sampler's
    generator (disjoint counters: row 0, tokens [j * V, (j + 1) * V) for draw j)."""
    V = row_logits.shape[-1]
    f = reference.filter_logits(row_logits, *settings)  # (1, V)
    seed_t, step_t = _seed_step(seed, 0)
    noise = S.gumbel_noise(1, n_draws * V, seed_t, step_t).view(n_draws, V)
    return (f + noise).argmax(-1).cpu()


def test_race_distribution_matches_sampling_probs_and_has_power():
    V = 12
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(21)) * 1.5
    T, k, p, m = 0.9, 9, 0.9, 0.02
    settings = _settings(1, T, k, p, m)
    n = S.MAX_VOCAB // V
    draws = _race_draws(row.to(DEV), settings, n, seed=99)
    counts = np.bincount(draws.numpy(), minlength=V)
    probs = reference.sampling_probs(row, *_settings(1, T, k, p, m, device="cpu"))[0].numpy()
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    assert (probs > 0).sum() >= 4, "the case must keep several tokens"
    assert _chi2_pvalue(counts, probs) > 1e-3
    # Power: the same statistic rejects a 10% temperature error and a nucleus one token short.
    wrong_t = reference.sampling_probs(row, *_settings(1, T * 1.1, k, p, m, device="cpu"))[0].numpy()
    assert _chi2_pvalue(counts, wrong_t) < 1e-3
    kept = np.flatnonzero(probs > 0)
    short = probs.copy()
    short[kept[np.argmin(probs[kept])]] = 0.0
    short /= short.sum()
    assert _chi2_pvalue(counts, short) < 1e-3


# --------------------------------------------------------------------------------------------
# API: out=, workspace reuse, validation
# --------------------------------------------------------------------------------------------
def test_out_and_workspace_reuse():
    V = 200
    ws = S.sampling_workspace(4, V, DEV)
    settings = _settings(3, [0.0, 1.0, 0.8], [0, 0, 10], [1.0, 1.0, 0.9], 0.0)
    logits = _unambiguous_logits((3, V), settings, seed=2)
    out = torch.full((3,), -1, dtype=torch.int64, device=DEV)
    tokens, _ = _run(logits, settings, workspace=ws, out=out)
    assert tokens.data_ptr() == out.data_ptr()
    assert ws["device"] == logits.device  # "cuda" is recorded as "cuda:0", as tensors report it
    expected, _ = _expected_race(logits, settings)
    assert torch.equal(out, expected)
    # A strided out, broadcast logits rows and expanded (stride-0) settings, same workspace.
    out2 = torch.full((2, 2), -1, dtype=torch.int64, device=DEV)[:, 0]
    s2 = tuple(s[2:3].expand(2) for s in settings)
    logits2 = logits[2:3].expand(2, V)
    tokens2, _ = _run(logits2, s2, workspace=ws, out=out2)
    assert tokens2.data_ptr() == out2.data_ptr()
    expected2, _ = _expected_race(logits2, s2)
    assert torch.equal(out2, expected2)


def _bad_call(**over):
    V = 16
    args = dict(
        logits=torch.randn(2, V, device=DEV),
        temperature=torch.ones(2, device=DEV),
        top_k=torch.zeros(2, dtype=torch.int32, device=DEV),
        top_p=torch.ones(2, device=DEV),
        min_p=torch.zeros(2, device=DEV),
        seed=torch.zeros(1, dtype=torch.int64, device=DEV),
        step=torch.zeros(1, dtype=torch.int64, device=DEV),
    )
    kw = {key: over.pop(key) for key in ("out", "workspace") if key in over}
    args.update(over)
    return S.sample(*args.values(), **kw)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(logits=torch.randn(16)), ValueError, "logits must have 2 dimensions"),
        (dict(logits=torch.ones(2, 16, dtype=torch.int32)), TypeError, "logits must have dtype"),
        (dict(logits=torch.randn(16, 2).t()), ValueError, "logits must be contiguous"),
        (dict(logits=torch.randn(2, S.MAX_VOCAB + 1)), ValueError, "vocabulary size"),
        (dict(temperature=torch.ones(2, dtype=torch.float64)), TypeError, "temperature must have dtype"),
        (dict(temperature=torch.ones(3)), ValueError, r"temperature must have shape \(2,\)"),
        (dict(top_k=torch.zeros(2, dtype=torch.int64)), TypeError, "top_k must have dtype"),
        (dict(top_p=torch.ones(2, 1)), ValueError, "top_p must have 1 dimensions"),
        (dict(min_p=[0.0, 0.0]), TypeError, "min_p must be a torch.Tensor"),
        (dict(seed=torch.zeros(2, dtype=torch.int64)), ValueError, r"seed must have shape \(1,\)"),
        (dict(seed=torch.zeros(1, dtype=torch.int32)), TypeError, "seed must have dtype"),
        (dict(step=torch.zeros(1)), TypeError, "step must have dtype"),
        (dict(out=torch.zeros(2, dtype=torch.int32)), TypeError, "out must have dtype"),
        (dict(out=torch.zeros(3, dtype=torch.int64)), ValueError, r"out must have shape \(2,\)"),
        (dict(workspace={"x": 1}), TypeError, "workspace must be a dict made by sampling_workspace"),
        (dict(temperature=torch.ones(2, device="meta")), ValueError, "temperature must be on"),
    ],
)
def test_bad_input_raises(over, exc, match):
    over = {k: (v.to(DEV) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in over.items()}
    with pytest.raises(exc, match=match):
        _bad_call(**over)


def test_workspace_mismatch_and_device_errors():
    with pytest.raises(ValueError, match="workspace was made for"):
        _bad_call(workspace=S.sampling_workspace(2, 17, DEV))
    with pytest.raises(ValueError, match="workspace was made for"):
        _bad_call(workspace=S.sampling_workspace(1, 16, DEV))
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        S.sample(torch.empty(2, 16, device=meta), *_settings(2, device=meta), *_seed_step(0, 0, device=meta))
    with pytest.raises(ValueError, match="batch must be"):
        S.sampling_workspace(0, 16, DEV)
    with pytest.raises(ValueError, match="vocab must be in"):
        S.sampling_workspace(1, 0, DEV)


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(temperature=-0.5), "temperature must be finite and >= 0"),
        (dict(temperature=float("nan")), "temperature must not be NaN"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.01), r"min_p must be in \[0, 1\]"),
    ],
)
def test_value_ranges(values, match):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    base.update(values)
    with pytest.raises(ValueError, match=match):
        S.check_sampling_settings(**base)
    if ON_CPU and "top_k" not in values or values.get("top_k") == -1:  # sample checks CPU tensors itself
        t = _settings(2, base["temperature"], base["top_k"], base["top_p"], base["min_p"], device="cpu")
        with pytest.raises(ValueError, match=match):
            _bad_call(**dict(zip(("temperature", "top_k", "top_p", "min_p"), t)))
    S.check_sampling_settings(torch.tensor([0.0, 2.0]), torch.tensor([0, 5]), torch.tensor([1.0, 0.1]), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# Bad scores: NaN / +inf / all -inf rows (contract C1: status flags, in-bounds writes)
# --------------------------------------------------------------------------------------------
_BAD_V = 300  # two interpreter chunks of 16 interleaved tiles of 16 tokens; K_C = 16 candidates


def _bad_row(pattern, V, g):
    """One row of logits with the named NaN / inf pattern (float32, CPU)."""
    x = torch.randn(V, generator=g) * 2.0
    nan, inf = float("nan"), float("inf")
    if pattern == "nan_row":
        x[:] = nan
    elif pattern == "nan_in_one_chunk":  # 32 NaNs in chunk 0 (tiles 0 and 2): more than K_C
        x[0:16] = nan
        x[32:48] = nan
    elif pattern == "last_token_nan":  # the last chunk of the last row once wrote past cand_val
        x[V - 1] = nan
    elif pattern == "pos_inf_row":
        x[:] = inf
    elif pattern == "pos_inf_some":
        x[16:32] = inf
        x[200:204] = inf
    elif pattern == "neg_inf_row":  # every token banned
        x[:] = -inf
    elif pattern == "nan_and_neg_inf":
        x[:] = -inf
        x[123] = nan
    elif pattern == "mixed":
        x[::3] = -inf
        x[5::7] = nan
        x[10::11] = inf
    elif pattern == "overflow":  # finite logits, l / T overflows to +inf at the tiny temperature
        x[7] = 3e38
    else:
        assert pattern == "clean"
    return x


_BAD_PATTERNS = ("nan_row", "nan_in_one_chunk", "last_token_nan", "pos_inf_row", "pos_inf_some", "neg_inf_row",
                 "nan_and_neg_inf", "mixed", "overflow", "clean")
# (temperature, top_k, top_p, min_p): greedy, keep-all, top-k, top-p, min-p, all filters.
_BAD_SETTINGS = ((0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.8, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0),
                 (1.0, 0, 1.0, 0.1), (1.2, 50, 0.95, 0.05))


def _guard(t, pad=4096):
    """``t``'s shape as a view in the middle of a larger poisoned buffer; ``check()`` asserts the
    padding on both sides is untouched (an out-of-bounds write of the kernels lands there)."""
    poison = -77777 if not t.is_floating_point() else 12345.0
    big = torch.full((pad + t.numel() + pad,), poison, dtype=t.dtype, device=t.device)
    view = big[pad:pad + t.numel()].view(t.shape)
    view.copy_(t)

    def check(name):
        assert bool((big[:pad] == poison).all()) and bool((big[pad + t.numel():] == poison).all()), (
            f"out-of-bounds write next to {name}")

    return view, check


def _guarded_workspace(B, V):
    ws = S.sampling_workspace(B, V, DEV)
    checks = []
    for name, value in list(ws.items()):
        if isinstance(value, torch.Tensor):
            ws[name], check = _guard(value)
            checks.append((name, check))
    return ws, checks


def _bad_batch(B, patterns, settings_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([_bad_row(p, _BAD_V, g) for p in patterns]).to(DEV)
    T, k, p, m = (list(c) for c in zip(*settings_rows))
    T = [1e-3 if pat == "overflow" and t > 0 else t for pat, t in zip(patterns, T)]
    return logits, _settings(B, T, k, p, m)


def _check_bad_batch(logits, settings, tokens, status, step, ws_checks=()):
    for name, check in ws_checks:
        check(name)
    B, V = logits.shape
    assert bool(((tokens >= 0) & (tokens < V)).all()), tokens.tolist()
    temperature = settings[0]
    flags = reference.sampling_status(logits, temperature)
    expected_status = torch.stack([flags, torch.where(flags != 0, step, 0).int()], dim=1)
    assert torch.equal(status.cpu(), expected_status.cpu()), (status.tolist(), expected_status.tolist())
    # Greedy and flagged rows: torch.argmax (the first NaN is the max; ties -> lowest index).
    argmax_rows = (temperature == 0) | (flags != 0)
    assert torch.equal(tokens[argmax_rows], logits.argmax(dim=-1)[argmax_rows])
    return flags


@pytest.mark.parametrize("B", [1, 64])
def test_bad_scores_write_in_bounds_and_are_flagged(B):
    """Every NaN / +inf / -inf pattern under every filter: writes stay inside the workspace, out and
    status (poisoned guard zones around each), sampling rows are flagged as the oracle flags them,
    greedy rows follow torch.argmax, and clean rows beside bad ones still draw the exact race."""
    if B == 1:
        cases = [([p], [_BAD_SETTINGS[5]]) for p in _BAD_PATTERNS] + [([p], [_BAD_SETTINGS[0]]) for p in _BAD_PATTERNS[:3]]
    else:  # every pattern under every setting (rows 60..63 repeat the first patterns, greedy)
        rows = [(_BAD_PATTERNS[b % 10], _BAD_SETTINGS[(b // 10) % 6]) for b in range(B)]
        cases = [([r[0] for r in rows], [r[1] for r in rows])]
    seen = 0
    for patterns, settings_rows in cases:
        logits, settings = _bad_batch(B, patterns, settings_rows)
        ws, checks = _guarded_workspace(B, _BAD_V)
        out, out_check = _guard(torch.full((B,), -1, dtype=torch.int64, device=DEV))
        status, status_check = _guard(torch.zeros(B, 2, dtype=torch.int32, device=DEV))
        seed_t, step_t = _seed_step(1234, 7)
        tokens = S.sample(logits, *settings, seed_t, step_t, out=out, workspace=ws, status=status)
        flags = _check_bad_batch(logits, settings, tokens, status, 7, checks + [("out", out_check), ("status", status_check)])
        path = ws["path"][:B].cpu()
        sampling = settings[0].cpu() > 0
        assert bool((((path & S.PATH_FLAGGED) != 0) == (sampling & (flags.cpu() != 0))).all()), path.tolist()
        clean = torch.tensor([p == "clean" for p in patterns]) & sampling
        if clean.any():
            expected, _ = _expected_race(logits, settings, seed=1234, step=7)
            assert torch.equal(tokens[clean.to(DEV)], expected[clean.to(DEV)])
        seen += int(((flags != 0) & sampling.to(DEV)).sum())
    assert seen >= (8 if B == 1 else 40)  # the patterns do reach the flags


def test_status_keeps_the_first_bad_step_and_accumulates_bits():
    """status[b, 1] is the step of the row's first bad step; later bad steps only OR their bits."""
    B = 3
    settings_rows = [_BAD_SETTINGS[3]] * B
    ws = S.sampling_workspace(B, _BAD_V, DEV)
    status = torch.zeros(B, 2, dtype=torch.int32, device=DEV)
    first, settings = _bad_batch(B, ["nan_in_one_chunk", "clean", "clean"], settings_rows)
    S.sample(first, *settings, *_seed_step(1, 4), workspace=ws, status=status)
    second, _ = _bad_batch(B, ["pos_inf_some", "neg_inf_row", "clean"], settings_rows, seed=1)
    S.sample(second, *settings, *_seed_step(1, 5), workspace=ws, status=status)
    expected = [[S.STATUS_NAN | S.STATUS_POS_INF, 4], [S.STATUS_NO_TOKEN, 5], [0, 0]]
    assert status.tolist() == expected
    # The oracle keeps the same record.
    ref_status = torch.zeros(B, 2, dtype=torch.int32, device=DEV)
    reference.sample(first, *settings, status=ref_status, step=4)
    reference.sample(second, *settings, status=ref_status, step=torch.tensor([5], device=DEV))
    assert ref_status.tolist() == expected


def test_reference_sample_flags_bad_rows_and_greedy_is_torch_argmax():
    B = len(_BAD_PATTERNS)
    logits, settings = _bad_batch(B, _BAD_PATTERNS, [_BAD_SETTINGS[5]] * B)
    status = torch.zeros(B, 2, dtype=torch.int32, device=DEV)
    tokens = reference.sample(logits, *settings, status=status, step=3)
    _check_bad_batch(logits, settings, tokens, status, 3)
    greedy = _settings(B, 0.0)
    g_status = torch.zeros(B, 2, dtype=torch.int32, device=DEV)
    assert torch.equal(reference.sample(logits, *greedy, status=g_status, step=3), logits.argmax(dim=-1))
    assert not g_status.any()  # greedy rows are never flagged
    nan_first = torch.tensor([[0.0, float("nan"), 5.0, float("nan")]], device=DEV)
    assert int(S.sample(nan_first, *_settings(1, 0.0), *_seed_step(0, 0))[0]) == 1 == int(nan_first.argmax())
    with pytest.raises(ValueError, match="status must be"):
        S.sample(nan_first, *_settings(1, 1.0), *_seed_step(0, 0), status=torch.zeros(1, 3, dtype=torch.int32, device=DEV))


# --------------------------------------------------------------------------------------------
# sm_90 compilation of every kernel configuration
# --------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, sys
import torch
from fastgpt.kernels import sampling as S
from fastgpt.kernels import sampling_noise as N
from fastgpt.kernels.utils import compile_for_hopper, triton_dtype
from tests.kernel_helpers import spill_bytes

PTR = {
    "temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "minp_ptr": "*fp32", "seed_ptr": "*i64",
    "cmax_ptr": "*fp32", "csum_ptr": "*fp32", "carg_ptr": "*i32", "ctheta_ptr": "*i32", "ccount_ptr": "*i32",
    "cgum_ptr": "*fp32", "cgidx_ptr": "*i32", "cval_ptr": "*fp32", "cidx_ptr": "*i32", "sval_ptr": "*fp32",
    "sidx_ptr": "*i32", "path_ptr": "*i32", "out_ptr": "*i64", "cflag_ptr": "*i32", "status_ptr": "*i32",
    "eos_ptr": "*i64", "n_gen_ptr": "*i64", "min_new_ptr": "*i64", "pad_ptr": "*i64", "finished_ptr": "*i1",
    "pos_ptr": "*i32", "arrive_ptr": "*i32",
}
# The decode step's launch: EOS ban, EOS bookkeeping, counters and PDL all on (the superset).
STEP_FLAGS = {"_chunk_kernel": {"BAN_EOS": True, "USE_PDL": True},
              "_row_kernel": {"HAS_EOS": True, "ADVANCE": True, "USE_PDL": True}}
# Contiguous (B,) settings and out: the strides a real launch passes as 1 (Triton specialises an
# int argument equal to 1 into a constexpr); the row stride is V, never 1 for a real vocabulary.
UNIT_STRIDES = ("stride_temp", "stride_topk", "stride_topp", "stride_minp", "stride_out")

results = []
for name, constexprs, num_warps, logit_dtype, step_dtype, ones in json.loads(sys.argv[1]):
    kernel = getattr(S if hasattr(S, name) else N, name)
    ptr = dict(PTR, out_ptr="*fp32") if name == "_noise_kernel" else PTR  # the noise is float32
    signature = {}
    constexprs = dict(constexprs, **STEP_FLAGS.get(name, {}))
    if ones:  # the unit strides of a real launch
        constexprs = dict(constexprs, **{p.name: 1 for p in kernel.params if p.name in UNIT_STRIDES})
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "logits_ptr":
            signature[arg] = "*" + triton_dtype(getattr(torch, logit_dtype))
        elif arg == "step_ptr":
            signature[arg] = "*" + triton_dtype(getattr(torch, step_dtype))
        elif arg.endswith("_ptr"):
            signature[arg] = ptr[arg]
        else:
            signature[arg] = "i32"
    compiled = compile_for_hopper(kernel, signature, constexprs, num_warps, 1)
    ptx = compiled.asm["ptx"]
    pdl = ["griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx]
    results.append([compiled.metadata.shared, spill_bytes(compiled.asm["cubin"]), pdl])
print(json.dumps(results))
"""


def test_every_config_compiles_for_sm90():
    """Every kernel at every GPU config compiles for sm_90 with fp32/fp16/bf16 logits, no spills.

    Runs in subprocesses without TRITON_INTERPRET: under the interpreter the kernels' helper
    functions are interpreter objects that the sm_90 compiler cannot inline.
    """
    # fp32 + unit strides + int64 step: what generate launches (contiguous settings, the model's
    # float32 logits); fp32 with generic strides (expanded settings); fp16 / bf16 with unit
    # strides, bf16 with an int32 step.
    variants = (("float32", "int64", True), ("float32", "int64", False), ("float16", "int64", True),
                ("bfloat16", "int32", True))
    # The configurations real vocabularies select (GPT-2, SmolLM2, LLaMA 3, Qwen 2) are all among
    # them, both kernels (no constexpr depends on the vocabulary itself, only on its config).
    for V in (50257, 49152, 128256, 151936):
        cfg = next(c for limit, c in S._GPU_CONFIGS if V <= limit)
        k1, k2 = S._kernel_constexprs(cfg)
        assert ("_chunk_kernel", k1, cfg.warps1) in S.SAMPLER_CONFIGS
        assert ("_row_kernel", k2, cfg.warps2) in S.SAMPLER_CONFIGS
    jobs = [(name, cx, warps, *v) for name, cx, warps in S.SAMPLER_CONFIGS for v in variants
            if name != "_noise_kernel"]
    # The noise kernel (gumbel_noise, which every CUDA test uses) reads no logits.
    jobs += [(name, cx, warps, "float32", step, ones) for name, cx, warps in S.SAMPLER_CONFIGS
             if name == "_noise_kernel" for step, ones in (("int64", False), ("int32", True))]
    assert {j[0] for j in jobs} == {"_chunk_kernel", "_row_kernel", "_noise_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    halves = [jobs[0::2], jobs[1::2]]  # two processes: the machine has two cores
    procs = [
        subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(h)], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for h in halves
    ]
    for half, proc in zip(halves, procs):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        for job, (shared, spills, (waits, triggers)) in zip(half, json.loads(stdout.strip().splitlines()[-1])):
            assert shared <= H100_SHARED_MEMORY_BYTES, (job, shared)
            assert spills == 0, f"{spills} bytes of register spills (stack/local memory) in {job}"
            if job[0] == "_chunk_kernel":  # PDL: waits for the LM head (dependents launch at its end)
                assert waits, f"no griddepcontrol.wait in the sm_90 PTX of {job}"
            if job[0] == "_row_kernel":  # PDL: waits for pass 1, lets the next step's embedding launch
                assert waits and triggers, f"griddepcontrol wait/launch_dependents missing in the PTX of {job}"


def test_configs_cover_every_vocab():
    for V in (1, 7, 4096, 4097, 49152, 50257, 65536, 65537, 128256, 151936, 200000, S.MAX_VOCAB):
        cfg = next(c for limit, c in S._GPU_CONFIGS if V <= limit)
        assert cfg.n_chunks(V) <= cfg.chunk_pad
        assert cfg.draw <= cfg.cap and cfg.tile % 4 == 0 and cfg.block % 4 == 0
    with pytest.raises(ValueError, match="vocab must be in"):
        S.select_config(S.MAX_VOCAB + 1)


# --------------------------------------------------------------------------------------------
# CUDA only: real sizes, direct distributions, graphs
# --------------------------------------------------------------------------------------------
_CUDA_MIXED = ([0.0, 1.0, 0.8, 1.0, 1.0, 0.7, 1.2, 0.9], [0, 0, 50, 0, 0, 40, 2000, 1], [1.0, 1.0, 1.0, 0.9, 1.0, 0.8, 0.95, 1.0],
               [0.0, 0.0, 0.0, 0.0, 0.05, 0.02, 0.0, 0.0])


# Each new (logits dtype, config tier, row-stride divisibility) JIT-compiles both kernels on the
# GPU (seconds each), so the cases reuse the few variants the other tests need anyway.
_REAL_SIZES = [
    (7, torch.float32, 4.0), (1000, torch.float16, 1.0), (50257, torch.float32, 4.0), (50257, torch.float16, 1.0),
    (50257, torch.bfloat16, 4.0), (128256, torch.bfloat16, 1.0), (128256, torch.float32, 4.0), (151936, torch.bfloat16, 4.0),
    (262144, torch.float32, 1.0), (262144, torch.bfloat16, 4.0),
]


@pytest.mark.cuda
@pytest.mark.parametrize("V, dtype, scale", _REAL_SIZES)
def test_cuda_matches_race_at_real_sizes(V, dtype, scale):
    B = 8
    settings = _settings(B, *_CUDA_MIXED)
    logits = _logits((B, V), dtype=dtype, scale=scale, seed=V % 97)
    ambiguous = 0
    for step in (0, 5):
        tokens, path = _run(logits, settings, seed=31, step=step)
        ambiguous += _check_race(tokens, logits, settings, seed=31, step=step)
    assert ambiguous <= B  # most rows have one allowed token: the check is exact there


@pytest.mark.cuda
@pytest.mark.parametrize("V", [50257, 128256])
@pytest.mark.parametrize("B", [64, 256])
def test_cuda_large_batch(V, B):
    g = torch.Generator().manual_seed(B)
    T = (torch.rand(B, generator=g) + 0.3).tolist()
    T[0] = 0.0
    k = torch.randint(0, 100, (B,), generator=g).tolist()
    p = torch.where(torch.rand(B, generator=g) < 0.6, torch.rand(B, generator=g) * 0.9 + 0.05, torch.ones(B)).tolist()
    m = torch.where(torch.rand(B, generator=g) < 0.3, torch.rand(B, generator=g) * 0.1, torch.zeros(B)).tolist()
    settings = _settings(B, T, k, p, m)
    logits = _logits((B, V), dtype=torch.bfloat16, scale=3.0, seed=B)
    tokens, path = _run(logits, settings, seed=1, step=2)
    assert _check_race(tokens, logits, settings, seed=1, step=2) <= B // 4
    seen = int(np.bitwise_or.reduce(path.numpy()))
    assert seen & (S.PATH_GREEDY | S.PATH_UNION) == S.PATH_GREEDY | S.PATH_UNION


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["flat_top_p", "huge_top_k", "ties_top_k", "ties_top_p"])
def test_cuda_fallback_paths(variant):
    V = 50257
    if variant == "flat_top_p":
        settings, kw = _settings(4, 1.0, 0, [0.9, 0.5, 0.99, 0.2], 0.0), {"scale": 1.0}
    elif variant == "huge_top_k":
        settings, kw = _settings(4, 1.0, [5000, 20000, 50000, 9000], 1.0, 0.0), {"scale": 1.0}
    elif variant == "ties_top_k":
        settings, kw = _settings(4, 1.0, [10, 100, 1000, 300], 1.0, 0.0), {"levels": 6}
    else:
        settings, kw = _settings(4, 1.0, 0, [0.3, 0.6, 0.9, 0.1], 0.0), {"levels": 6}
    logits = _logits((4, V), dtype=torch.bfloat16, seed=3, **kw)
    tokens, path = _run(logits, settings, seed=4, step=1)
    _check_race(tokens, logits, settings, seed=4, step=1)
    assert (path & S.PATH_FALLBACK).any(), path.tolist()


# (V, levels, group size range, first position, path bits). With the GPU configs: HEAD = 64, the
# union of V = 4096 covers ~the top 250 tokens and that of 50257 ~3300, CAP = 2048. (The same
# cases run on the CPU interpreter with these configs in test_gpu_configurations.)
_TIE_CASES = {
    "tie_head": (4096, 400, 3, 40, 1, S.PATH_HEAD),
    "tie_union": (4096, 200, 3, 60, 100, S.PATH_UNION | S.PATH_TIE_SPLIT),
    "tie_row_compact": (50257, 40, 4, 2047, 5000, S.PATH_ROW_COMPACT | S.PATH_TIE_SPLIT),
    "tie_row": (50257, 20, 2049, None, 5000, S.PATH_TIE_ROW | S.PATH_TIE_SPLIT),
}


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(_TIE_CASES))
def test_cuda_tie_splits(variant):
    V, levels, gmin, gmax, start, want = _TIE_CASES[variant]
    logits, top_p = _tie_split_case(V, levels, seed=2, group_min=gmin, group_max=gmax, min_start=start)
    settings = _settings(1, 1.0, 0, top_p, 0.0)
    assert _margins(logits, settings)[1], "the cut must be unambiguous"
    tokens, path = _run(logits, settings, seed=8, step=8)
    expected, _ = _expected_race(logits, settings, seed=8, step=8)
    assert torch.equal(tokens, expected), path.tolist()
    assert int(path[0]) & want == want, path.tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("regime", ["union", "fallback", "keep_all"])
def test_cuda_distribution_through_sample(regime):
    """B identical rows x steps drawn by sample itself, chi-square vs sampling_probs + power."""
    V, B, steps = 1000, 2000, 5
    if regime == "union":
        T, k, p, m, scale = 0.8, 40, 0.9, 0.01, 3.0
    elif regime == "fallback":
        T, k, p, m, scale = 1.0, 0, 0.9, 0.0, 0.7
    else:
        T, k, p, m, scale = 1.3, 0, 1.0, 0.0, 3.0
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * scale
    settings = _settings(B, T, k, p, m)
    logits = row.expand(B, V).contiguous().to(DEV)
    ws = S.sampling_workspace(B, V, DEV)
    counts = np.zeros(V, dtype=np.int64)
    for step in range(steps):
        tokens, path = _run(logits, settings, seed=2024, step=step, workspace=ws)
        counts += np.bincount(tokens.cpu().numpy(), minlength=V)
    bit = {"union": S.PATH_UNION, "fallback": S.PATH_FALLBACK, "keep_all": S.PATH_KEEP_ALL}[regime]
    assert (path & bit).all(), path.unique().tolist()
    cpu = _settings(1, T, k, p, m, device="cpu")
    probs = reference.sampling_probs(row, *cpu)[0].numpy()
    assert counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts, probs) > 1e-3
    if regime != "fallback":  # (a flat nucleus of ~900 tokens needs far more draws for power)
        wrong = reference.sampling_probs(row, *_settings(1, T * 1.1, k, p, m, device="cpu"))[0].numpy()
        assert _chi2_pvalue(counts, wrong) < 1e-3


@pytest.mark.cuda
def test_cuda_support_over_many_draws():
    V, B = 50257, 512
    settings = _settings(B, [0.9, 1.0, 1.1, 0.7] * (B // 4), [50, 0, 0, 20] * (B // 4), [1.0, 0.8, 0.95, 0.5] * (B // 4),
                         [0.0, 0.0, 0.05, 0.0] * (B // 4))
    logits = _logits((B, V), dtype=torch.float16, scale=3.0, seed=6)
    # Allowed: the longest kept prefix float rounding permits (the reference's, bar ambiguity).
    allowed = torch.zeros(B, V, dtype=torch.bool, device=DEV)
    for b, (order, _, l_loose) in enumerate(_prefix_bounds(logits, settings)):
        allowed[b, order[:l_loose]] = True
    assert (allowed.sum(-1) >= torch.isfinite(reference.filter_logits(logits, *settings)).sum(-1)).all()
    ws = S.sampling_workspace(B, V, DEV)
    for step in range(20):
        tokens, _ = _run(logits, settings, seed=9, step=step, workspace=ws)
        assert allowed[torch.arange(B, device=DEV), tokens].all()


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    V, B = 50257, 4
    settings = _settings(B, [0.0, 1.0, 0.8, 1.0], [0, 0, 50, 0], [1.0, 1.0, 0.9, 0.7], [0.0, 0.0, 0.0, 0.05])
    logits = _logits((B, V), scale=3.0, seed=1)
    ws = S.sampling_workspace(B, V, DEV)
    out = torch.empty(B, dtype=torch.int64, device=DEV)
    seed, step = _seed_step(5, 0)
    S.sample(logits, *settings, seed, step, out=out, workspace=ws)  # warm-up compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S.sample(logits, *settings, seed, step, out=out, workspace=ws)
    for s in range(3):
        step.fill_(s)
        settings[0][1] = 1.0 + 0.1 * s  # settings change in place between replays
        graph.replay()
        torch.cuda.synchronize()
        _check_race(out, logits, settings, seed=5, step=s)
        eager = S.sample(logits, *settings, seed, step, workspace=S.sampling_workspace(B, V, DEV))
        assert torch.equal(out, eager), "graph replay and eager call disagree"


@pytest.mark.cuda
def test_cuda_cpu_tensors_are_refused():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        S.sample(torch.randn(1, 8), *_settings(1, device="cpu"), *_seed_step(0, 0, device="cpu"))


# --------------------------------------------------------------------------------------------
# The decode step's bookkeeping inside the sampler (EOS ban, EOS -> pad, counters)
# --------------------------------------------------------------------------------------------
def _book(B, eos, *, finished=(), n_generated=0, min_new=None, pos=7, device=DEV):
    """The step-bookkeeping tensors of :func:`S.sample` (finished: the rows already finished)."""
    done = torch.zeros(B, dtype=torch.bool, device=device)
    done[list(finished)] = True
    return dict(
        eos=torch.tensor(eos, dtype=torch.int64, device=device), pad=torch.tensor([0], dtype=torch.int64, device=device),
        finished=done, n_generated=torch.tensor([n_generated], dtype=torch.int64, device=device),
        min_new_tokens=None if min_new is None else torch.tensor([min_new], dtype=torch.int64, device=device),
        cache_pos=torch.tensor([pos], dtype=torch.int32, device=device),
    )  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampling"])
def test_step_bookkeeping_eos_pad_and_counters(temperature):
    """Rows that emit an EOS id finish, finished rows emit pad, the counters advance once per
    launch (not per row), and the arrival count is left at 0 for the next launch."""
    B, V = 4, 1001  # several chunks: EOS ids owned by different chunks
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(B, V, generator=g).to(DEV)
    settings = _settings(B, T=temperature, k=40)
    seed_t, step_t = _seed_step(77, 3)
    expected, _ = _expected_race(logits, settings, 77, 3) if temperature else (logits.argmax(-1), None)
    # Rows 0 and 2 draw an EOS id; row 3 finished earlier; row 1 draws an ordinary token.
    eos = [int(expected[0]), int(expected[2]), V - 1]
    assert int(expected[1]) not in eos
    book = _book(B, eos, finished=[3])
    ws = S.sampling_workspace(B, V, DEV)
    out = torch.full((B,), -5, dtype=torch.int64, device=DEV)  # poisoned
    got = S.sample(logits, *settings, seed_t, step_t, workspace=ws, out=out, cache_advance=1, **book)
    assert got is out
    want = expected.clone()
    want[3] = 0  # the pad id
    assert out.tolist() == want.tolist()
    assert book["finished"].tolist() == [True, False, True, True]
    assert int(step_t) == 4 and int(book["n_generated"]) == 1 and int(book["cache_pos"]) == 8
    assert int(ws["arrivals"]) == 0
    ran = launch_record()["sample"]
    assert ran["launches"] == 2 and ran["eos"] and ran["advance"] and not ran["ban_eos"]


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampling"])
def test_step_bookkeeping_bans_eos_before_min_new_tokens(temperature):
    """While n_generated < min_new_tokens every EOS id scores -inf (in the logits too, as the
    reference bans in place); from then on EOS may be drawn."""
    B, V = 3, 1001
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(B, V, generator=g).to(DEV)
    eos = [5, 300, 777]  # in different chunks of the interleaved layout
    logits[0, 300] = 40.0  # row 0's argmax (and near-certain draw) is an EOS id
    logits[2, 777] = 40.0
    settings = _settings(B, T=temperature)
    for n_generated, min_new, banned in ((1, 2, True), (2, 2, False)):
        book = _book(B, eos, n_generated=n_generated, min_new=min_new)
        scores = logits.clone()
        oracle = logits.clone()
        if banned:
            reference_ban = oracle.index_select(1, book["eos"])  # (B, n_eos)
            oracle.index_copy_(1, book["eos"], torch.full_like(reference_ban, float("-inf")))
        expected = _expected_race(oracle, settings, 9, 0)[0] if temperature else oracle.argmax(-1)
        seed_t, step_t = _seed_step(9, 0)
        got = S.sample(scores, *settings, seed_t, step_t, cache_advance=0, **book)
        finished = [t in eos for t in expected.tolist()]
        assert got.tolist() == expected.tolist() and book["finished"].tolist() == finished
        assert torch.equal(scores, oracle)  # the ban is written into the logits, nothing else
        assert int(book["cache_pos"]) == 7 and int(book["n_generated"]) == n_generated + 1
        assert launch_record()["sample"]["ban_eos"]
        if banned:
            assert not any(finished)
        else:
            assert finished[0] and finished[2]


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(pad=None), ValueError, "eos, pad and finished must be given together"),
        (dict(eos=torch.zeros(0, dtype=torch.int64)), ValueError, "eos must hold at least one id"),
        (dict(finished=torch.zeros(3, dtype=torch.int32)), TypeError, "finished must have dtype"),
        (dict(finished=torch.zeros(2, dtype=torch.bool)), ValueError, r"finished must have shape \(3,\)"),
        (dict(cache_pos=torch.zeros(1, dtype=torch.int64)), TypeError, "cache_pos must have dtype"),
        (dict(cache_pos=None), ValueError, "cache_pos must be given with n_generated"),
        (dict(n_generated=None, min_new_tokens=None), ValueError, "cache_pos is advanced only together"),
        (dict(eos=None, pad=None, finished=None), ValueError, "min_new_tokens needs eos, pad, finished and n_generated"),
        (dict(cache_advance=-1), ValueError, "cache_advance must be an int >= 0, got -1"),
    ],
)
def test_step_bookkeeping_bad_arguments_raise_before_any_launch(change, error, message):
    B, V = 3, 50
    args = {**_book(B, [1, 2], min_new=2), "cache_advance": 1, **change}
    args = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    calls = launch_record().get("sample", {}).get("calls", 0)
    seed_t, step_t = _seed_step(1, 0)
    with pytest.raises(error, match=message):
        S.sample(torch.randn(B, V, device=DEV), *_settings(B), seed_t, step_t, **args)
    assert launch_record().get("sample", {}).get("calls", 0) == calls
