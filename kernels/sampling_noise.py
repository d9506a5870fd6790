"""Gumbel noise of the fused sampler: counter-based Philox, one stream per (seed, step, row, token).

Maths
-----
Philox-4x32-10 (``tl.philox``): key = the 64-bit ``seed``, counter = ``(i >> 2, row, step_lo,
step_hi)``; token ``i`` uses output word ``i & 3``. So every token of every (seed, step, row) has
its own stream, rows and steps are independent, the same seed and step give the same tokens, and
the noise of token ``i`` does not depend on the kernel configuration.

``E ~ Exp(1)`` from the 32 random bits ``r`` without ever hitting ``log(0)``: the top bit picks a
half, ``w = ((r & 0x7fffffff) + 0.5) * 2^-32`` lies in ``(0, 0.5]``; ``E = -log(w)`` for the upper
half of ``U``, ``E = -log1p(-w)`` (a 4-term series below ``w < 2^-7``, where ``log(1 - w)`` would
lose digits) for the lower half. So ``U = w`` or ``1 - w`` is uniform on ``(0, 1)`` with a
resolution of ``2^-32`` at *both* ends: ``E`` ranges over ``[1.2e-10, 22.9]`` and never is 0 or
inf. The Gumbel noise of a token is ``-log(E)``; the sampler returns
``argmax_{i in K} x_i - log(E_i)``.

Shapes and dtypes
-----------------
``seed``: ``(1,)`` int64; ``step``: ``(1,)`` int32 or int64 (split into two 32-bit counter words);
noise float32. :func:`gumbel_noise` returns the ``(batch, vocab)`` noise (tests recompute every
draw with it); the ``@triton.jit`` helpers are what :mod:`fastgpt.kernels.sampling` calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_tensor, interpreting, triton_usable_on

__all__ = ["gumbel_noise", "NOISE_BLOCK", "MAX_NOISE_VOCAB"]

#: :func:`gumbel_noise`'s block on a GPU (a test / debugging op).
NOISE_BLOCK = 1024
#: Largest vocabulary :func:`gumbel_noise` accepts (the sampler's limit).
MAX_NOISE_VOCAB = 262144


# --------------------------------------------------------------------------------------------
# Device helpers (called by the sampler's kernels)
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp1(r):
    """Exp(1) sample from 32 random bits (uint32), in [1.2e-10, 22.9]; see the module docstring."""
    ri = r.to(tl.int32, bitcast=True)
    w = ((ri & 0x7FFFFFFF).to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (0, 0.5]
    # -log(1 - w): a series where 1 - w would cancel digits (error < w^4 / 5 relative).
    series = w * (1.0 + w * (0.5 + w * (0.3333333432674408 + w * 0.25)))
    e_low = tl.where(w < 0.0078125, series, -tl.log(1.0 - w))
    return tl.where(ri < 0, -tl.log(w), e_low)


@triton.jit
def _noise_at(idx, seed, row, step_lo, step_hi):
    """Gumbel noise ``-log(E)`` of tokens ``idx`` (int32, any order)."""
    c0 = idx >> 2
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + row, zero + step_lo, zero + step_hi)
    lane = idx & 3
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return -tl.log(_exp1(r))


@triton.jit
def _noise_x4(c0, seed, row, step_lo, step_hi, N: tl.constexpr):
    """Gumbel noise of the ``N`` tokens ``4 * c0[q] + m`` (``c0``: ``(N // 4,)``), in that order.

    One Philox call yields the four words of four consecutive tokens: 4x fewer Philox rounds than
    :func:`_noise_at`, and the same numbers.
    """
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + row, zero + step_lo, zero + step_hi)
    # join(join(r0, r2), join(r1, r3))[q, j, k] = r_{2j + k}[q]: flat 4q + 2j + k -> word 2j + k.
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # (N // 4, 2, 2)
    r = tl.reshape(r, (N,))  # (N,), token order
    return -tl.log(_exp1(r))


@triton.jit
def _step_words(step_ptr):
    step = tl.load(step_ptr).to(tl.int64)
    return (step & 0xFFFFFFFF).to(tl.int32), ((step >> 32) & 0xFFFFFFFF).to(tl.int32)


# --------------------------------------------------------------------------------------------
# The noise kernel and its launcher
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["V"])
def _noise_kernel(out_ptr, V, seed_ptr, step_ptr, BLOCK: tl.constexpr, PER_TOKEN: tl.constexpr):
    """``out[b, i]`` = the Gumbel noise of token ``i`` of row ``b`` (see :func:`gumbel_noise`)."""
    b = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    step_lo, step_hi = _step_words(step_ptr)
    if PER_TOKEN:
        noise = _noise_at(offs, seed, b, step_lo, step_hi)
    else:
        noise = _noise_x4((start >> 2) + tl.arange(0, BLOCK // 4), seed, b, step_lo, step_hi, BLOCK)
    tl.store(out_ptr + b.to(tl.int64) * V + offs, noise, mask=offs < V)


def gumbel_noise(batch: int, vocab: int, seed: torch.Tensor, step: torch.Tensor, *, per_token: bool = False) -> torch.Tensor:
    """The Gumbel noise ``-log(E)`` :func:`sample` adds to each scaled logit, ``(batch, vocab)`` fp32.

    ``sample`` returns ``argmax_{i in K} x_i + noise[b, i]`` (``K`` the kept set, ``x`` the scaled
    logits), so tests can recompute every draw. ``per_token`` selects the scattered-index
    generator the union path uses instead of the 4-tokens-per-Philox-call one (both must agree).
    """
    check_tensor(seed, "seed", ndim=1, dtypes=(torch.int64,))
    check_tensor(step, "step", ndim=1, dtypes=(torch.int32, torch.int64), device=seed.device)
    if seed.shape[0] != 1 or step.shape[0] != 1:
        raise ValueError("seed and step must have shape (1,)")
    if batch < 1 or not 1 <= vocab <= MAX_NOISE_VOCAB:
        raise ValueError(f"need batch >= 1 and vocab in [1, {MAX_NOISE_VOCAB}], got {batch}, {vocab}")
    if not triton_usable_on(seed.device):
        raise RuntimeError(f"gumbel_noise needs a CUDA device or TRITON_INTERPRET=1, got {seed.device}")
    out = torch.empty(batch, vocab, dtype=torch.float32, device=seed.device)
    block = 16384 if interpreting() else NOISE_BLOCK
    _noise_kernel[(batch, triton.cdiv(vocab, block))](out, vocab, seed, step, BLOCK=block, PER_TOKEN=per_token,
                                                      num_warps=4)
    return out
