"""Fused causal attention prefill over the preallocated KV cache (Triton), with grouped-query
heads and rotary position embedding.

Shapes, dtypes, the online-softmax maths and the autotuning rules are in
:mod:`fastgpt.kernels.attention_common`; semantics: :func:`fastgpt.reference.attention`.

Prefill (:func:`prefill_attention`, cache slots ``[0, T)``)
--------------------------------------------------------------
``q`` is ``(B, T, H, D)``; ``k, v`` are ``(B, T, H_kv, D)`` and the caches ``(B, H_kv, S_max, D)``
with ``G = H / H_kv`` query heads per K/V head (query head ``h`` reads K/V head ``h // G``;
GPT-2 has ``G = 1``, Llama-3 ``G = 4``, SmolLM2 3, Qwen2.5-0.5B 7).

Grid ``(B*H_kv, cdiv(T*G, BLOCK_M))``: one program per (row, K/V head, block of BLOCK_M tile rows),
heaviest (last) block first for causal load balance. The tile rows are the flat index
``f = slot * G + g`` over (query slot, query head ``g`` of the group), so one program handles
every query head of its group and reads each K/V tile once for all of them (the point of
grouped-query attention: K/V traffic shrinks by G), and no row is padding whatever G is (3 and 7
are not powers of two; padding the group to 4 or 8 would waste a quarter or an eighth of every
dot). Row ``f`` sees key ``j`` when ``row_start <= j <= f // G``; a tile's query slots run from
``f0 // G`` to ``(f0 + BLOCK_M - 1) // G``, so only the key blocks reaching into that range are
masked. With ``G = 1`` this is the ungrouped kernel with GPT-2's configs: ``G`` is a constexpr,
the grouped index maths sits behind ``GROUP == 1`` branches, and the sm_90 code matches the
ungrouped kernel's (same registers; identical SASS at float16, three integer instructions apart at
bfloat16).

Each program first copies new ``k, v`` rows into the cache (so the cache write is part of the same
launch, with no separate copy kernel): the slots whose first query head (``g = 0``) is one of its
tile rows, ``[cdiv(f0, G), cdiv(f0 + BLOCK_M, G))``; these ranges partition ``[0, T)``, so every
slot has exactly one writer. It then runs a flash-attention forward over keys read from the
``k, v`` inputs themselves (never from the cache, which other programs of the same launch are
writing: no race). Key blocks entirely before ``row_start`` are skipped, blocks entirely below the
tile's first query slot and after ``row_start`` run without any score mask, and only the (at
most one) block straddling ``row_start`` and the diagonal blocks are masked. ``T x T`` is never
materialised.

Rotary embedding (``rope``: the ``(D/2,)`` float32 inverse frequencies)
-----------------------------------------------------------------------
Applied in the prologue of the same launch, where q and k are loaded anyway, with Hugging Face's
rotate-half convention (:func:`fastgpt.reference.apply_rope`) at positions ``slot - row_start``
clamped >= 0 (the raw row_start: a negative one shifts the positions as in the reference, though
it masks nothing). The halves ``x1, x2`` of each head vector are loaded as two ``(rows, D/2)``
tiles, rotated in float32 (``f = pos * inv_freq``, ``[x1 cos f - x2 sin f, x2 cos f + x1 sin f]``)
and rounded once to the dtype; ``q . k`` is then the sum of the two half-width dots, so the
rotated halves never need to be concatenated. The queries are rotated once per program; the keys
each time a program loads a key tile (a program cannot read another's rotated keys from the cache
within the launch), which costs ``BLOCK_N * D/2`` sine/cosine pairs per tile against
``BLOCK_M * BLOCK_N * D`` multiply-adds of each dot. The cache receives the rotated k (written by
its one writer, with the same rounding the scores use) and v unchanged. Sines and cosines come from
a Cody-Waite reduction and minimax polynomials (:func:`_sincos`, the decode kernel's numerics, so
a key is rotated identically in both), about 1e-7 absolute error for angles up to 1e6 rad:
libdevice's would keep a Payne-Hanek array in local memory, which the no-spill check forbids.

Configs: GPT-2's case (``G = 1``, no rope) keeps ``PREFILL_CONFIGS``; grouped heads or rope in 16
bits use ``PREFILL_CONFIGS_GQA`` (their extra registers spilled the 4-warp tiles); float32 uses
``PREFILL_CONFIGS_FP32``, or ``PREFILL_CONFIGS_FP32_GQA`` with grouped heads or rope. The autotune
key includes G and rope.
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
    _dot,
    _sincos,
    _triton_configs,
    _tune_bench,
)
from .utils import interpreting, note_launch

__all__ = [
    "prefill_attention", "prefill_configs", "PREFILL_CONFIGS", "PREFILL_CONFIGS_GQA", "PREFILL_CONFIGS_FP32",
    "PREFILL_CONFIGS_FP32_GQA",
    "INTERPRETER_PREFILL_CONFIG",
]

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
#: Prefill configs for float16/bfloat16 with grouped-query heads (H_kv < H) or rope. Both add
#: live registers to a kernel that PREFILL_CONFIGS already fill (248 of 255 at 64x64, 4 warps):
#: the per-row (query slot, head) indexing, and the float32 sines, cosines and rotated halves of
#: each key tile. Two warpgroups over a 64x32 tile have the headroom: no spills for any group in
#: {1, 2, 3, 4, 6, 7, 8}, rope on or off, head_dim 64 or 128 (ptxas sm_90); with 8 warps, 64x64
#: and 128x32 spilled 100-200 B at some groups (64x64: group 7 with rope), 128x64 without rope,
#: and the 4-warp 64x64 and 64x32 tiles spilled too. Chosen for registers only: not yet timed
#: on a GPU against larger tiles.
PREFILL_CONFIGS_GQA: list[dict] = [
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
]
#: Prefill configs for float32 (IEEE FMA dots: small tiles, every operand lives in registers).
#: float32 is the accuracy path, not a speed target: one config, so nothing is tuned or compiled twice.
#: 32x16 with 8 warps is the largest tile without register spills at head_dim 128 (ptxas sm_90;
#: 64x32 spilled 1.6 KB, 32x32 and 64x16 still ~100 B).
PREFILL_CONFIGS_FP32: list[dict] = [
    dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
]
#: float32 with grouped heads or rope: 32x16 spilled 8 B at head_dim 64 with rope and groups 2, 4
#: and 8 once compiled as it launches (16-byte aligned pointers and strides), 32x16/4 warps and
#: 64x16 / 32x32 at head_dim 128; 16x16 with 4 warps is spill-free for every group, rope on or off.
PREFILL_CONFIGS_FP32_GQA: list[dict] = [
    dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
]
#: The single config used under the Triton interpreter (autotuning there would run every config).
INTERPRETER_PREFILL_CONFIG: dict = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------
# Prefill kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _rope(x1, x2, pos, inv_freq):
    """Rotate the halves ``x1, x2`` ``(R, D/2)`` of R head vectors at positions ``pos`` ``(R,)``.

    Hugging Face's rotate-half convention (:func:`fastgpt.reference.apply_rope`): with
    ``f = pos * inv_freq`` (float32), ``[x1, x2] -> [x1 cos f - x2 sin f, x2 cos f + x1 sin f]``,
    computed in float32 and rounded once to x's dtype.
    """
    f = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # (R, D/2)
    sin_f, cos_f = _sincos(f)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * cos_f - b * sin_f).to(x1.dtype), (b * cos_f + a * sin_f).to(x2.dtype)


@triton.jit
def _load_heads(base, row_off, ok, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Load ``(R, D)`` head vectors at ``base + row_off[:, None] + d`` (rows with ``ok`` false read 0).

    With ``ROPE`` the two halves come back as separate ``(R, D/2)`` tiles (the rotation mixes
    them, and the dot over D is the sum of the dots over the halves); without it the second
    result is the first (unused by the callers).
    """
    if ROPE:
        offs_h = tl.arange(0, HEAD_DIM // 2)
        ptrs = base + row_off[:, None] + offs_h[None, :]
        x1 = tl.load(ptrs, mask=ok[:, None], other=0.0)
        x2 = tl.load(ptrs + HEAD_DIM // 2, mask=ok[:, None], other=0.0)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        x1 = tl.load(base + row_off[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        x2 = x1
    return x1, x2


@triton.jit
def _copy_kv_rows(
    k_base, v_base, kc_base, vc_base, slots, ok, stride_kt, stride_vt, rope_origin, inv_freq,
    HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
):
    """Copy the new ``k, v`` of cache ``slots`` ``(R,)`` (rows with ``ok``) into the cache, k rotated
    at positions ``slot - rope_origin`` (clamped >= 0) when ``ROPE``."""
    k1, k2 = _load_heads(k_base, slots * stride_kt, ok, HEAD_DIM, ROPE)
    cache_row = slots * HEAD_DIM  # contiguous (S_max, D) slab
    if ROPE:
        k1, k2 = _rope(k1, k2, tl.maximum(slots - rope_origin, 0), inv_freq)
        offs_h = tl.arange(0, HEAD_DIM // 2)
        tl.store(kc_base + cache_row[:, None] + offs_h[None, :], k1, mask=ok[:, None])
        tl.store(kc_base + cache_row[:, None] + HEAD_DIM // 2 + offs_h[None, :], k2, mask=ok[:, None])
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        tl.store(kc_base + cache_row[:, None] + offs_d[None, :], k1, mask=ok[:, None])
    v, _ = _load_heads(v_base, slots * stride_vt, ok, HEAD_DIM, False)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(vc_base + cache_row[:, None] + offs_d[None, :], v, mask=ok[:, None])


@triton.jit
def _prefill_tile(
    acc,
    l_i,
    m_i,
    q,
    q2,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_f,
    start_n,
    rs,
    rope_origin,
    inv_freq,
    T,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    MASKED: tl.constexpr,
    ROPE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the key block [start_n, start_n + BLOCK_N).

    ``offs_f`` (BLOCK_M,): the flat index ``query slot * GROUP + head in the group`` of each tile
    row. ``MASKED`` blocks apply the causal and row_start masks to the scores; unmasked blocks are
    known (from the caller's loop bounds) to hold only keys every query row may see. With ``ROPE``, ``q, q2`` are the rotated halves of
    the queries and the keys are rotated here, as they are loaded (see the module docstring).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key slots
    n_ok = offs_n < T
    k, k2 = _load_heads(k_base, offs_n * stride_kt, n_ok, HEAD_DIM, ROPE)
    v, _ = _load_heads(v_base, offs_n * stride_vt, n_ok, HEAD_DIM, False)
    if ROPE:
        k, k2 = _rope(k, k2, tl.maximum(offs_n - rope_origin, 0), inv_freq)
        qk = _dot(q, tl.trans(k), IEEE, UPCAST) + _dot(q2, tl.trans(k2), IEEE, UPCAST)
    else:
        qk = _dot(q, tl.trans(k), IEEE, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        # Causal (j <= i) and left padding (j >= row_start). Keys j >= T were loaded as 0;
        # they can only be "allowed" for query rows i >= T, which are never stored.
        # Row r's query slot is offs_f // GROUP, and j <= offs_f // GROUP  <=>  j * GROUP <= offs_f
        # (no division in the loop).
        allowed = (offs_n[None, :] * GROUP <= offs_f[:, None]) & (offs_n[None, :] >= rs)
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
@triton.jit(do_not_specialize=["T", "H_KV", "S_MAX", "T_BUCKET", "BH_BUCKET"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    rs_ptr,
    freq_ptr,  # (D/2,) float32 rotary inverse frequencies (read only when ROPE)
    out_ptr,
    T,
    H_KV,
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
    GROUP: tl.constexpr,  # query heads per K/V head (H / H_kv)
    ROPE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N")
    bh = tl.program_id(0)  # (row, K/V head)
    # Heaviest query block (most keys under the causal mask) first.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // H_KV
    hk = bh % H_KV
    # Tile row r is the flat (query slot, head in the group) index f0 + r = slot * GROUP + g.
    f0 = m_block * BLOCK_M
    offs_f = f0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    if GROUP == 1:
        slot_m = offs_f  # GPT-2: exactly the ungrouped kernel
        g_m = 0
    else:
        slot_m = offs_f // GROUP  # (BLOCK_M,) query slot of each row
        g_m = offs_f % GROUP  # (BLOCK_M,) query head of each row within the group
    m_ok = offs_f < T * GROUP
    # Batch/head base offsets in int64: B*T*3C or B*H*S_max*D can exceed 2**31.
    b64 = b.to(tl.int64)
    h64 = hk.to(tl.int64)
    rope_origin = tl.load(rs_ptr + b)  # rotary position 0 (raw row_start, as rope_positions)
    rs = tl.maximum(rope_origin, 0)  # negative row_start == no padding
    if ROPE:
        inv_freq = tl.load(freq_ptr + tl.arange(0, HEAD_DIM // 2))  # (D/2,) fp32
    else:
        inv_freq = tl.zeros([HEAD_DIM // 2], tl.float32)  # unused
    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + h64 * stride_vh

    # 1) New K/V into the cache, each slot by exactly one program: the one whose tile holds the
    #    slot's first query head (flat row slot * GROUP), i.e. slots [cdiv(f0, G), cdiv(f0 + BLOCK_M, G)).
    cache_off = bh.to(tl.int64) * S_MAX * HEAD_DIM  # contiguous (B, H_kv, S_max, D)
    if GROUP == 1:
        slots = offs_f
        slot_ok = m_ok
    else:
        # cdiv(BLOCK_M, GROUP) <= BLOCK_M slots: one BLOCK_M-row tile, the tail masked off.
        w_hi = tl.minimum(tl.cdiv(f0 + BLOCK_M, GROUP), T)
        slots = tl.cdiv(f0, GROUP) + tl.arange(0, BLOCK_M)
        slot_ok = slots < w_hi
    _copy_kv_rows(
        k_base, v_base, kc_ptr + cache_off, vc_ptr + cache_off, slots, slot_ok, stride_kt, stride_vt,
        rope_origin, inv_freq, HEAD_DIM, ROPE,
    )

    # 2) Flash attention over keys [row_start, last query slot], read from the k/v inputs.
    q, q2 = _load_heads(
        q_ptr + b64 * stride_qb + (h64 * GROUP) * stride_qh, slot_m * stride_qt + g_m * stride_qh, m_ok,
        HEAD_DIM, ROPE,
    )  # (BLOCK_M, D), or its two (BLOCK_M, D/2) halves with ROPE
    if ROPE:
        q, q2 = _rope(q, q2, tl.maximum(slot_m - rope_origin, 0), inv_freq)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Query slots of this tile: [m_lo, hi); m_lo == f0 (a multiple of BLOCK_N) when GROUP == 1.
    # Key blocks (BLOCK_N aligned; c_start: the block holding m_lo):
    #   A [lo, a_end):            the block holding row_start, when it lies before c_start (row_start mask)
    #   B [a_end, c_start):       valid for every query row of this tile: no mask at all
    #   C [max(lo, c_start), hi): the diagonal blocks (causal mask; row_start too when it falls there)
    # Blocks before lo hold only padding and are skipped. A is at most one block; it runs as the
    # first iteration of C's masked loop, so the kernel has two loops to compile, not three.
    m_lo = f0 // GROUP
    hi = tl.minimum((f0 + BLOCK_M - 1) // GROUP + 1, T)
    c_start = (m_lo // BLOCK_N) * BLOCK_N
    lo = (rs // BLOCK_N) * BLOCK_N
    a_end = tl.minimum(tl.cdiv(rs, BLOCK_N) * BLOCK_N, c_start)
    for start_n in range(tl.maximum(a_end, lo), c_start, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, q2, k_base, v_base, stride_kt, stride_vt, offs_f, start_n, rs, rope_origin,
            inv_freq, T, qk_scale, HEAD_DIM, BLOCK_N, GROUP, False, ROPE, IEEE, UPCAST,
        )
    has_a = (a_end > lo).to(tl.int32)  # 0 or 1
    c_lo = tl.maximum(lo, c_start)
    n_masked = has_a + tl.cdiv(tl.maximum(hi - c_lo, 0), BLOCK_N)
    for i in range(0, n_masked):
        start_n = tl.where(i < has_a, lo, c_lo + (i - has_a) * BLOCK_N)
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, q2, k_base, v_base, stride_kt, stride_vt, offs_f, start_n, rs, rope_origin,
            inv_freq, T, qk_scale, HEAD_DIM, BLOCK_N, GROUP, True, ROPE, IEEE, UPCAST,
        )

    # Pad queries (slot < row_start) saw no key: l_i == 0 and acc == 0, so they output 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    o_row = slot_m * stride_ot + g_m * stride_oh
    tl.store(
        out_ptr + b64 * stride_ob + (h64 * GROUP) * stride_oh + o_row[:, None] + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None],
    )


# The autotuned kernel (the interpreter calls the raw kernel with one fixed config instead).
# The tuner adds every tensor argument's dtype to the key by itself.
_TUNE_KEY = ["HEAD_DIM", "GROUP", "ROPE", "T_BUCKET", "BH_BUCKET"]
_prefill_tuned = triton.autotune(configs=_triton_configs(PREFILL_CONFIGS), key=_TUNE_KEY, do_bench=_tune_bench)(
    _prefill_kernel
)
_prefill_tuned_gqa = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS_GQA), key=_TUNE_KEY, do_bench=_tune_bench
)(_prefill_kernel)
_prefill_tuned_fp32 = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS_FP32), key=_TUNE_KEY, do_bench=_tune_bench
)(_prefill_kernel)
_prefill_tuned_fp32_gqa = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS_FP32_GQA), key=_TUNE_KEY, do_bench=_tune_bench
)(_prefill_kernel)


def prefill_configs(dtype: torch.dtype, group: int, rope: bool) -> list[dict]:
    """The autotune configs of a call: with grouped heads (``group = H / H_kv > 1``) or rope,
    PREFILL_CONFIGS_FP32_GQA (float32) or PREFILL_CONFIGS_GQA; GPT-2's case PREFILL_CONFIGS_FP32
    (float32) or PREFILL_CONFIGS."""
    if dtype == torch.float32:
        return PREFILL_CONFIGS_FP32_GQA if group > 1 or rope else PREFILL_CONFIGS_FP32
    return PREFILL_CONFIGS_GQA if group > 1 or rope else PREFILL_CONFIGS


def _tuned_kernel(dtype: torch.dtype, group: int, rope: bool):
    if dtype == torch.float32:
        return _prefill_tuned_fp32_gqa if group > 1 or rope else _prefill_tuned_fp32
    return _prefill_tuned_gqa if group > 1 or rope else _prefill_tuned


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
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``k, v`` into cache slots ``[0, T)`` and return causal attention of the T queries.

    Parameters
    ----------
    q : (B, T, H, D) tensor, float16/bfloat16/float32, last dimension contiguous (any other
        strides, e.g. a view of the fused QKV projection). ``D`` in {64, 128}; ``T <= S_max``.
    k, v : (B, T, H_kv, D), same dtype, last dimension contiguous; ``H_kv`` divides ``H``
        (grouped-query attention: query head ``h`` reads K/V head ``h // (H // H_kv)``).
    k_cache, v_cache : (B, H_kv, S_max, D) contiguous, same dtype and device; slots ``[0, T)`` are
        overwritten (in the same launch as the attention), k rotated when ``rope`` is given.
    row_start : (B,) int32 on the same device: first valid slot of each row (left padding).
    out : optional (B, T, H, D) destination, last dimension contiguous (may be a view of a
        ``(B, T, H*D)`` buffer).
    rope : optional (D/2,) float32 contiguous rotary inverse frequencies: q and k are rotated at
        positions ``slot - row_start`` (clamped >= 0) before the scores and the cache write
        (:func:`fastgpt.reference.apply_rope`).

    Returns
    -------
    torch.Tensor
        (B, T, H, D) in q's dtype (``out`` when given); zeros for pad queries (slot < row_start).
    """
    B, T, H, D, S_max = _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode=False, rope=rope)
    H_kv = k.shape[2]
    group = H // H_kv
    if interpreting():
        min_block_m = INTERPRETER_PREFILL_CONFIG["BLOCK_M"]
    else:
        min_block_m = min(c["BLOCK_M"] for c in prefill_configs(q.dtype, group, rope is not None))
    if B * H_kv > _INT32_MAX or triton.cdiv(T * group, min_block_m) > 65535:
        raise ValueError(
            f"grid too large: batch * n_kv_head must be < 2**31 (got {B * H_kv}) and T * (n_head / n_kv_head) "
            f"<= {65535 * min_block_m} (got {T} * {group})"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_prefill(q, k, v, k_cache, v_cache, row_start, out, rope=rope)
    note_launch("attention_prefill", "triton", tokens=T)
    return out


def _launch_prefill(q, k, v, k_cache, v_cache, row_start, out, config: dict | None = None, rope=None) -> None:
    """Launch the prefill kernel on validated inputs.

    ``config`` (tests only) pins one config (of :func:`prefill_configs`' lists) instead of the autotuner (or of ``INTERPRETER_PREFILL_CONFIG`` under the interpreter).
    """
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    S_max = k_cache.shape[2]
    ieee = q.dtype == torch.float32
    args = (
        q, k, v, k_cache, v_cache, row_start,
        row_start if rope is None else rope,  # freq_ptr: never read without ROPE
        out,
        T, H_kv, S_max, _bucket(T, 16, 8192), _bucket(B * H, 1, 1024),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _LOG2E / math.sqrt(D),
    )
    group = H // H_kv

    def grid(meta):
        # One program per (row, K/V head, BLOCK_M rows of the flat (query slot, head in the group)).
        return (B * H_kv, triton.cdiv(T * group, meta["BLOCK_M"]))

    if config is None and interpreting():
        config = INTERPRETER_PREFILL_CONFIG
    constexprs = dict(HEAD_DIM=D, GROUP=group, ROPE=rope is not None, IEEE=ieee)
    if config is not None:
        _prefill_kernel[grid](
            *args, **constexprs, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            UPCAST=interpreting() and q.dtype == torch.bfloat16,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        _tuned_kernel(q.dtype, group, rope is not None)[grid](*args, **constexprs)
