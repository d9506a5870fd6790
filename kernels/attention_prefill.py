"""Fused causal attention prefill over the preallocated KV cache (Triton).

Shapes, dtypes, the online-softmax maths and the autotuning rules are in
:mod:`fastgpt.kernels.attention_common`; semantics: :func:`fastgpt.reference.attention`.

Prefill (:func:`prefill_attention`, cache slots ``[0, T)``)
--------------------------------------------------------------
Grid ``(B*H, cdiv(T, BLOCK_M))``, one program per (row, head, block of BLOCK_M queries), heaviest
(last) query block first for causal load balance. Each program first copies its own BLOCK_M rows
of ``k, v`` into the cache (so the cache write is part of the same launch, with no separate copy
kernel), then runs a flash-attention forward over keys read from the ``k, v`` inputs themselves
(never from the cache, which other programs of the same launch are writing: no race). Key blocks
entirely before ``row_start`` are skipped, blocks entirely below the diagonal and after
``row_start`` run without any score mask, and only the (at most one) block straddling
``row_start`` and the diagonal blocks are masked. ``T x T`` is never materialised.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_common import (
    _INT32_MAX,
    _LOG2E,
    _NEG_BIG,
    _bucket,
    _check_qkv_and_cache,
    _triton_configs,
    _tune_bench,
)
from .utils import interpreting, note_launch

__all__ = ["prefill_attention", "PREFILL_CONFIGS", "PREFILL_CONFIGS_FP32", "INTERPRETER_PREFILL_CONFIG"]

# --------------------------------------------------------------------------------------------
# Configurations: every config the autotuner may pick (the compile test iterates these).
# --------------------------------------------------------------------------------------------
#: Prefill configs for float16/bfloat16 (tensor-core dots). Kept short: the autotuner compiles
#: every one of them for each (dtype, head_dim) it meets, at a few seconds each.
#: 64x64 for short prompts (more programs), 128x32 with two warpgroups for long ones. Every entry
#: is free of register spills at head_dim 128 (ptxas sm_90; the compile test fails on any):
#: 128x64 spilled with one warpgroup (348+ B) and with two (48 B).
PREFILL_CONFIGS: list[dict] = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
]
#: Prefill configs for float32 (IEEE FMA dots: small tiles, every operand lives in registers).
#: float32 is the accuracy path, not a speed target: one config, so nothing is tuned or compiled twice.
#: 32x16 with 8 warps is the largest tile without register spills at head_dim 128 (ptxas sm_90;
#: 64x32 spilled 1.6 KB, 32x32 and 64x16 still ~100 B).
PREFILL_CONFIGS_FP32: list[dict] = [
    dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
]
#: The single config used under the Triton interpreter (autotuning there would run every config).
INTERPRETER_PREFILL_CONFIG: dict = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------
# Prefill kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation.

    ``IEEE``: float32 inputs use exact FMA dots instead of TF32. ``UPCAST`` (interpreter + bfloat16
    only): the Triton 3.6 interpreter multiplies bfloat16 bit patterns as integers, so the
    (already bf16-rounded) operands are widened to float32 first -- the same products the tensor
    cores compute exactly, accumulated in float32.
    """
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _prefill_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    start_n,
    rs,
    T,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the key block [start_n, start_n + BLOCK_N).

    ``MASKED`` blocks apply the causal and row_start masks to the scores; unmasked blocks are
    known (from the caller's loop bounds) to hold only keys every query row may see.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = offs_n < T
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    qk = _dot(q, tl.trans(k), IEEE, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        # Causal (j <= i) and left padding (j >= row_start). Keys j >= T were loaded as 0;
        # they can only be "allowed" for query rows i >= T, which are never stored.
        allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= rs)
        qk = tl.where(allowed, qk * qk_scale, float("-inf"))
    else:
        qk = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])  # masked entries: exp2(-inf) = 0
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, l_i, m_new


# Sizes vary from call to call: do not let Triton compile a variant per "== 1" / "% 16" value.
@triton.jit(do_not_specialize=["T", "H", "S_MAX", "T_BUCKET", "BH_BUCKET"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    rs_ptr,
    out_ptr,
    T,
    H,
    S_MAX,
    T_BUCKET,  # autotune key only (power-of-two bucket of T)
    BH_BUCKET,  # autotune key only (power-of-two bucket of B*H)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N")
    bh = tl.program_id(0)
    # Heaviest query block (most keys under the causal mask) first.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = m_block * BLOCK_M
    # Batch/head base offsets in int64: B*T*3C or B*H*S_max*D can exceed 2**31.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rs = tl.maximum(tl.load(rs_ptr + b), 0)  # negative row_start == no padding

    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query slots
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    m_ok = offs_m < T
    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + h64 * stride_vh

    # 1) This program's rows of the new K/V go into cache slots [m0, m0 + BLOCK_M).
    cache_off = bh.to(tl.int64) * S_MAX * HEAD_DIM  # contiguous (B, H, S_max, D)
    k_rows = tl.load(k_base + offs_m[:, None] * stride_kt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    tl.store(kc_ptr + cache_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], k_rows, mask=m_ok[:, None])
    v_rows = tl.load(v_base + offs_m[:, None] * stride_vt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    tl.store(vc_ptr + cache_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], v_rows, mask=m_ok[:, None])

    # 2) Flash attention over keys [row_start, min(m0 + BLOCK_M, T)), read from the k/v inputs.
    q = tl.load(
        q_ptr + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=m_ok[:, None],
        other=0.0,
    )  # (BLOCK_M, D)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Key blocks (BLOCK_M is a multiple of BLOCK_N, so m0 is block aligned):
    #   A [lo, a_end):       the block holding row_start, when it lies before m0 (row_start mask)
    #   B [a_end, m0):       valid for every query row of this block: no mask at all
    #   C [max(lo, m0), hi): the diagonal blocks (causal mask; row_start too when it falls there)
    # Blocks before lo hold only padding and are skipped. A is at most one block; it runs as the
    # first iteration of C's masked loop, so the kernel has two loops to compile, not three.
    lo = (rs // BLOCK_N) * BLOCK_N
    a_end = tl.minimum(tl.cdiv(rs, BLOCK_N) * BLOCK_N, m0)
    hi = tl.minimum(m0 + BLOCK_M, T)
    for start_n in range(tl.maximum(a_end, lo), m0, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
            start_n, rs, T, qk_scale, BLOCK_N, False, IEEE, UPCAST,
        )
    has_a = (a_end > lo).to(tl.int32)  # 0 or 1
    c_lo = tl.maximum(lo, m0)
    n_masked = has_a + tl.cdiv(tl.maximum(hi - c_lo, 0), BLOCK_N)
    for i in range(0, n_masked):
        start_n = tl.where(i < has_a, lo, c_lo + (i - has_a) * BLOCK_N)
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
            start_n, rs, T, qk_scale, BLOCK_N, True, IEEE, UPCAST,
        )

    # Pad queries (slot < row_start) saw no key: l_i == 0 and acc == 0, so they output 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(
        out_ptr + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None],
    )


# The autotuned kernel (the interpreter calls the raw kernel with one fixed config instead).
# The tuner adds every tensor argument's dtype to the key by itself.
_prefill_tuned = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS), key=["HEAD_DIM", "T_BUCKET", "BH_BUCKET"], do_bench=_tune_bench
)(_prefill_kernel)
_prefill_tuned_fp32 = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS_FP32), key=["HEAD_DIM", "T_BUCKET", "BH_BUCKET"], do_bench=_tune_bench
)(_prefill_kernel)


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------
def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_start: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``k, v`` into cache slots ``[0, T)`` and return causal attention of the T queries.

    Parameters
    ----------
    q, k, v : (B, T, H, D) tensors, float16/bfloat16/float32, last dimension contiguous (any other
        strides, e.g. views of the fused QKV projection). ``D`` in {64, 128}; ``T <= S_max``.
    k_cache, v_cache : (B, H, S_max, D) contiguous, same dtype and device; slots ``[0, T)`` are
        overwritten (in the same launch as the attention).
    row_start : (B,) int32 on the same device: first valid slot of each row (left padding).
    out : optional (B, T, H, D) destination, last dimension contiguous (may be a view of a
        ``(B, T, H*D)`` buffer).

    Returns
    -------
    torch.Tensor
        (B, T, H, D) in q's dtype (``out`` when given); zeros for pad queries (slot < row_start).
    """
    B, T, H, D, S_max = _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode=False)
    ieee = q.dtype == torch.float32
    if interpreting():
        min_block_m = INTERPRETER_PREFILL_CONFIG["BLOCK_M"]
    else:
        min_block_m = min(c["BLOCK_M"] for c in (PREFILL_CONFIGS_FP32 if ieee else PREFILL_CONFIGS))
    if B * H > _INT32_MAX or triton.cdiv(T, min_block_m) > 65535:
        raise ValueError(
            f"grid too large: batch * n_head must be < 2**31 (got {B * H}) and T <= {65535 * min_block_m} (got {T})"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_prefill(q, k, v, k_cache, v_cache, row_start, out)
    note_launch("attention_prefill", "triton", tokens=T)
    return out


def _launch_prefill(q, k, v, k_cache, v_cache, row_start, out, config: dict | None = None) -> None:
    """Launch the prefill kernel on validated inputs.

    ``config`` (tests only) pins one entry of ``PREFILL_CONFIGS``/``PREFILL_CONFIGS_FP32`` instead of
    the autotuner (or of ``INTERPRETER_PREFILL_CONFIG`` under the interpreter).
    """
    B, T, H, D = q.shape
    S_max = k_cache.shape[2]
    ieee = q.dtype == torch.float32
    args = (
        q, k, v, k_cache, v_cache, row_start, out,
        T, H, S_max, _bucket(T, 16, 8192), _bucket(B * H, 1, 1024),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _LOG2E / math.sqrt(D),
    )

    def grid(meta):
        return (B * H, triton.cdiv(T, meta["BLOCK_M"]))

    if config is None and interpreting():
        config = INTERPRETER_PREFILL_CONFIG
    if config is not None:
        _prefill_kernel[grid](
            *args, HEAD_DIM=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], IEEE=ieee,
            UPCAST=interpreting() and q.dtype == torch.bfloat16,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        tuned = _prefill_tuned_fp32 if ieee else _prefill_tuned
        tuned[grid](*args, HEAD_DIM=D, IEEE=ieee)
