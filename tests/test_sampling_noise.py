"""Tests of the sampler's Gumbel noise (kernels/sampling_noise.py): the two Philox generators agree,
every (seed, step, row) is its own stream, int32 and int64 steps key the same one, and the noise is
standard Gumbel (chi-square of ``exp(-exp(-noise))`` against the uniform, tails included). That the
sampler adds exactly this noise is tested in test_sampling.py (the recomputed race).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastgpt.kernels import sampling_noise as N
from tests.test_sampling import _chi2_pvalue, _seed_step


def test_noise_generators_agree_and_are_keyed():
    seed, step = _seed_step(-5, 2**33 + 7)
    a = N.gumbel_noise(3, 1001, seed, step)
    b = N.gumbel_noise(3, 1001, seed, step, per_token=True)
    assert torch.equal(a, b), "4-per-Philox and per-token noise differ"
    assert torch.isfinite(a).all() and a.min() > -4 and a.max() < 24  # -log(E), E in [1.2e-10, 22.9]
    seed2, step2 = _seed_step(-5, 7)  # only the high word of the step differs
    c = N.gumbel_noise(3, 1001, seed2, step2)
    d = N.gumbel_noise(3, 1001, *_seed_step(-4, 2**33 + 7))
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert not torch.equal(a[0], a[1])  # rows are different streams
    # int32 and int64 steps key the same stream.
    e = N.gumbel_noise(3, 1001, *_seed_step(-5, 7, step_dtype=torch.int32))
    assert torch.equal(c, e)


def test_noise_is_standard_gumbel():
    """U = exp(-exp(-noise)) must be uniform on (0, 1): chi-square over 50 bins of 2^18 values."""
    seed, step = _seed_step(123, 4)
    noise = N.gumbel_noise(1, N.MAX_NOISE_VOCAB, seed, step).double().cpu()
    u = torch.exp(-torch.exp(-noise)).numpy()
    counts, _ = np.histogram(u, bins=50, range=(0.0, 1.0))
    assert _chi2_pvalue(counts, np.full(50, 1 / 50)) > 1e-3
    # The tails: P(U < 1e-3) and P(U > 1 - 1e-3) are 1e-3 each.
    n = u.size
    for frac in ((u < 1e-3).mean(), (u > 1 - 1e-3).mean()):
        assert abs(frac - 1e-3) < 5 * math.sqrt(1e-3 / n)
