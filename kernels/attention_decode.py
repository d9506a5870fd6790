"""Fused causal attention decode over the preallocated KV cache: flash-decoding (Triton).

Shapes, dtypes, the online-softmax maths and the autotuning rules are in
:mod:`fastgpt.kernels.attention_common`; semantics: :func:`fastgpt.reference.attention`.

Decode (:func:`decode_attention`, one new token at device slot ``cache_pos``)
--------------------------------------------------------------------------------
Flash-decoding. The cache length ``S_max`` is cut into ``n_split`` chunks of ``CHUNK`` slots
(a function of the cache shape only, see :func:`decode_num_splits`), grid ``(B*H_kv, n_split)``:
one program per (row, K/V head, split). Split program ``s`` computes ``(m_s, l_s, acc_s)`` over
the valid slots of ``[s*CHUNK, (s+1)*CHUNK)`` before ``cache_pos``; a combine kernel merges them
with log-sum-exp weights ``2^(m_s - M)``. Programs whose chunk starts after ``cache_pos`` write
nothing and the combine kernel never reads them, so the launch shape never depends on
``cache_pos`` (CUDA-graph safe: ``cache_pos`` is only read on the device). With ``n_split == 1``
the split kernel normalises and writes the output itself and the combine kernel is not launched.

Grouped-query heads (``H_kv < H``, LLaMA-family models): query head ``h`` reads K/V head
``h // G`` with ``G = H / H_kv``. Decode is bound by the K/V bytes read, so the ``G`` query heads
of a K/V head share ONE program, which reads each K/V tile of its chunk once: a ``(16, D)`` query
block (the group, zero-padded to the 16 rows ``tl.dot`` needs) against the ``(BLOCK_N, D)`` key
tile -- ``S = Q K^T`` and ``P V`` are tensor-core dots (float32: IEEE FMA dots), and since the
loads now feed dots Triton software-pipelines them (cp.async, ``DECODE_GROUP_CONFIGS`` with
``num_stages >= 2``). A group of more than 16 heads (multi-query models) takes ``cdiv(G, 16)``
programs per K/V head and split (grid ``(B*H_kv*cdiv(G, 16), n_split)``). ``G = 1`` (GPT-2) keeps
its own constexpr path: a ``(D,)`` query and elementwise score sums, no padding to 16 rows, and
``DECODE_CONFIGS``, exactly as before grouping existed. The partials stay per QUERY head
(``(B, H, n_split, D)``), so the combine kernel and :func:`combined_attention_tile` do not know
about groups.

Rotary embedding (``rope`` = the ``(D/2,)`` float32 inverse frequencies): fused into the split
kernel's prologue, no extra launch. q (all heads of the program) and the new k are rotated at
position ``cache_pos - row_start[b]`` clamped at 0 (:func:`fastgpt.reference.rope_positions`;
``row_start`` as given, unclamped) with Hugging Face's rotate-half convention: feature ``d``
pairs with ``(d + D/2) % D``, so each vector is loaded twice (plain and at the partner offsets,
an L1 hit) and ``x' = x cos f + sign * x_partner sin f`` with ``f = pos * inv_freq[d % (D/2)]``,
all in float32 (:func:`_sincos`: own range reduction, no libdevice stack frame), rounded once to
the input dtype. The rotated k is what the scores use and what the owning program writes into
the cache (the cache holds rotated keys, as the reference's); v is not rotated. Cached keys are
never rotated again.

Combine in the next kernel (``combine=False``): the split kernel writes its partials (with
``n_split == 1`` too) and nothing else runs; :func:`decode_attention` returns an
:class:`AttentionPartials` that the out-projection GEMV (``kernels.linear.linear(...,
attn_partials=...)``) combines in its prologue, for the K columns (= heads x head_dim) each of its
programs reads, with :func:`combined_attention_tile` -- the same sums as the combine kernel. One
launch per layer fewer.

Programmatic dependent launch (:func:`kernels.utils.pdl_enabled`): the split kernel waits
(``gdc_wait``) before its first read, since everything it reads (q, k, v, the cache, the
positions) may come from earlier kernels, then lets the next kernel launch at once, so the
out-projection's weight stream overlaps the attention.

Append-then-attend without a race: the slot ``cache_pos`` is read only by the split that owns it
(``cache_pos // CHUNK``). Its programs never read the slot from memory: they use the new ``k, v``
they hold in registers for that slot (one extra online-softmax step), and one of them (group
block 0) is the only program that stores them into the cache. Every other split only reads slots
``< cache_pos``, which no program of this launch writes.

``cache_pos`` cannot be checked on the host without a device sync. If it is outside
``[0, S_max)`` nothing is written to the cache and the output is NaN (loud, but no memory fault
and no device assert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_common import (
    SUPPORTED_HEAD_DIMS,
    _INT32_MAX,
    _LOG2E,
    _NEG_BIG,
    _check_qkv_and_cache,
    _dot,
    _sincos,
    _next_pow2,
    _triton_configs,
    _tune_bench,
)
from .utils import check_tensor, interpreting, note_launch, pdl_enabled

__all__ = [
    "AttentionPartials",
    "combined_attention_tile",
    "decode_attention",
    "decode_workspace",
    "decode_num_splits",
    "decode_chunk",
    "warmup_decode",
    "DECODE_CONFIGS",
    "DECODE_MAX_TILE",
    "decode_configs_for",
    "DECODE_GROUP_CONFIGS",
    "decode_group_configs_for",
    "decode_group_block",
    "COMBINE_CONFIG",
    "INTERPRETER_DECODE_CONFIG",
]

# --------------------------------------------------------------------------------------------
# Configurations: every config the autotuner may pick (the compile test iterates these).
# --------------------------------------------------------------------------------------------
#: Decode split-kernel configs of the per-head path (``H_kv == H``, GPT-2; BLOCK_N = keys per
#: inner tile). Its loop's loads do not feed a dot, so Triton does not software-pipeline them:
#: memory parallelism comes from many resident programs (small num_warps) and wide tiles, not
#: from num_stages.
DECODE_CONFIGS: list[dict] = [
    dict(BLOCK_N=32, num_warps=2, num_stages=1),
    dict(BLOCK_N=64, num_warps=4, num_stages=1),
    dict(BLOCK_N=128, num_warps=8, num_stages=1),
]
#: Largest ``BLOCK_N * HEAD_DIM`` key tile the split kernel holds without register spills
#: (ptxas sm_90: 128 keys at head_dim 128 spill ~200 B at any warp count, every dtype; 128 keys
#: at head_dim 64 do not). The autotuner skips larger tiles (:func:`decode_configs_for`).
DECODE_MAX_TILE = 8192


def decode_configs_for(head_dim: int) -> list[dict]:
    """The entries of ``DECODE_CONFIGS`` the autotuner tries at ``head_dim``."""
    return [c for c in DECODE_CONFIGS if c["BLOCK_N"] * head_dim <= DECODE_MAX_TILE]


#: Grouped-query split-kernel configs (``H / H_kv > 1``). Both products are tensor-core dots here
#: (float32: IEEE FMA dots), so Triton software-pipelines the K/V tile loads (cp.async into
#: shared memory, ``num_stages`` >= 2) on top of the parallelism of many resident programs.
DECODE_GROUP_CONFIGS: list[dict] = [
    dict(BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, num_warps=8, num_stages=2),
]
#: float32 group tiles: at most this many ``BLOCK_N * HEAD_DIM * num_stages`` elements in flight
#: (ptxas sm_90: 32 keys at head_dim 128 without pipelining spill 280 B, 128 keys x 2 stages 536 B).
DECODE_GROUP_MAX_STAGED_FP32 = 16384
#: Query rows of one grouped program: ``tl.dot`` needs at least 16. A group of ``G <= 16`` heads
#: is zero-padded to 16 rows; a larger group (multi-query models) takes ``cdiv(G, 16)`` programs
#: per K/V head and split, each reading the chunk once for its 16 heads.
DECODE_GROUP_BLOCK = 16


def decode_group_block(group: int) -> int:
    """Query rows per program for ``group = H / H_kv``: 1 (GPT-2's per-head path, no dot) or
    ``DECODE_GROUP_BLOCK``."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group (n_head / n_kv_head) must be a positive int, got {group!r}")
    return 1 if group == 1 else DECODE_GROUP_BLOCK


def decode_group_configs_for(head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The entries of ``DECODE_GROUP_CONFIGS`` the autotuner tries at ``head_dim`` and ``dtype``."""
    return [
        c for c in DECODE_GROUP_CONFIGS
        if dtype != torch.float32 or c["BLOCK_N"] * head_dim * c["num_stages"] <= DECODE_GROUP_MAX_STAGED_FP32
    ]  # fmt: skip


#: The combine kernel is not tuned (a few microseconds of work).
COMBINE_CONFIG: dict = dict(SPLIT_BLOCK=32, num_warps=4, num_stages=1)
#: The single config used under the Triton interpreter (autotuning there would run every config),
#: by both the per-head and the grouped path.
INTERPRETER_DECODE_CONFIG: dict = dict(BLOCK_N=16, num_warps=4, num_stages=1)
#: Flash-decoding split heuristic: aim for about this many split programs (~8 per SM on a
#: 132-SM H100, so the tail of the last wave is small), with chunks of at least this many slots.
DECODE_TARGET_PROGRAMS = 1024
DECODE_MIN_CHUNK = 128


# --------------------------------------------------------------------------------------------
# Decode kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _active_splits(pos, S_MAX, CHUNK, N_SPLIT):
    """(number of splits whose chunk starts at or before ``pos``, pos in [0, S_MAX)); none when out of range.

    Splits 0 .. pos // CHUNK wrote partials (a split with no valid slot wrote m=-1e30, l=0).
    """
    pos_ok = (pos >= 0) & (pos < S_MAX)
    n_active = tl.where(pos_ok, tl.minimum(tl.maximum(pos, 0) // CHUNK + 1, N_SPLIT), 0)
    return n_active, pos_ok


@triton.jit
def combined_attention_tile(o_part_ptr, m_part_ptr, l_part_ptr, rows, mask_rows, cols, mask_cols, H, N_SPLIT, n_active, pos_ok, HEAD_DIM: tl.constexpr):
    """The normalised attention output at ``(rows, cols)``: float32 ``(R, C)``.

    ``rows`` are batch rows ``b`` (R,), ``cols`` features ``h * HEAD_DIM + d`` (C,) of the
    ``(B, 1, H * HEAD_DIM)`` output; the partials are :func:`decode_workspace`'s ``(B, H, n_split,
    D)`` / ``(B, H, n_split)``. The same two passes and split order as the combine kernel:
    ``M = max_s m_s``, ``o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`` over the first
    ``n_active`` splits; 0 where no slot is valid (a pad row), NaN when ``pos_ok`` is false.
    """
    head = cols // HEAD_DIM
    d = cols % HEAD_DIM
    part0 = (rows.to(tl.int64)[:, None] * H + head[None, :]) * N_SPLIT  # (R, C): index of split 0
    mask = mask_rows[:, None] & mask_cols[None, :]
    m_max = tl.full(part0.shape, _NEG_BIG, tl.float32)
    for s in range(0, n_active):
        m_max = tl.maximum(m_max, tl.load(m_part_ptr + part0 + s, mask=mask, other=_NEG_BIG))
    l_tot = tl.zeros(part0.shape, tl.float32)
    acc = tl.zeros(part0.shape, tl.float32)
    for s in range(0, n_active):
        w = tl.exp2(tl.load(m_part_ptr + part0 + s, mask=mask, other=_NEG_BIG) - m_max)
        l_tot += w * tl.load(l_part_ptr + part0 + s, mask=mask, other=0.0)
        acc += w * tl.load(o_part_ptr + (part0 + s) * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    o = acc / tl.where(l_tot > 0.0, l_tot, 1.0)
    return tl.where(pos_ok, o, float("nan"))


@triton.jit
def _rope_tables(rope_ptr, position, HEAD_DIM: tl.constexpr):
    """Rotary tables at ``position``: ``(cos, signed sin, partner)``, each ``(HEAD_DIM,)``.

    Feature ``d`` rotates with its partner ``(d + D/2) % D`` (rotate-half): ``x'_d = x_d cos f +
    s_d x_partner sin f`` with ``f = position * inv_freq[d % (D/2)]`` in float32 and ``s_d = -1``
    on the first half, ``+1`` on the second (``rotate_half([a, b]) = [-b, a]``).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    f = position.to(tl.float32) * tl.load(rope_ptr + offs_d % (HEAD_DIM // 2))
    sin, cos = _sincos(f)
    return cos, tl.where(offs_d < HEAD_DIM // 2, -sin, sin), (offs_d + HEAD_DIM // 2) % HEAD_DIM


@triton.jit
def _attend_one_head(q, k_new, v_new, kc_base, vc_base, start, lo, hi, new_ok, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of one query head over cached slots ``[lo, hi)`` (tiles from the aligned
    ``start``), then the new token from registers when ``new_ok``: ``(m, l, acc)``, fp32 scalars and
    ``(D,)``. ``q`` is ``(D,)`` float32, pre-scaled to log2 units; no dot: elementwise sums."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.max(tl.full([BLOCK_N], _NEG_BIG, tl.float32), 0)  # fp32 scalar
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_ok = (offs_n >= lo) & (offs_n < hi)
        # Issue both tile loads before any maths so they are in flight together.
        k = tl.load(kc_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(vc_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1)  # (BLOCK_N,)
        s = tl.where(n_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    s_new = tl.sum(q * k_new.to(tl.float32), 0)
    s_new = tl.where(new_ok, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha + p_new * v_new.to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _attend_group(
    q, k_new, v_new, kc_base, vc_base, start, lo, hi, new_ok, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """:func:`_attend_one_head` for a ``(BLOCK_G, D)`` block of query heads sharing one K/V head
    (input dtype, zero rows for padding): each K/V tile is loaded once and feeds two dots,
    ``S = Q K^T`` and ``P V``. Returns ``(m, l, acc)``: ``(BLOCK_G,)``, ``(BLOCK_G,)``, ``(BLOCK_G, D)``."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_ok = (offs_n >= lo) & (offs_n < hi)
        k = tl.load(kc_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(vc_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale  # (BLOCK_G, BLOCK_N) fp32, log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new

    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # (BLOCK_G,)
    s_new = tl.where(new_ok, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["H_KV", "GROUP", "N_GBLK", "S_MAX", "CHUNK", "N_SPLIT", "normalize"])
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    rs_ptr,
    rope_ptr,
    o_part_ptr,
    m_part_ptr,
    l_part_ptr,
    out_ptr,
    H_KV,
    GROUP,
    N_GBLK,
    S_MAX,
    CHUNK,
    N_SPLIT,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_ob,
    stride_oh,
    qk_scale,
    normalize,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ROPE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per (row b, K/V head, split), for the GROUP query heads hkv*GROUP .. +GROUP-1
    # (N_GBLK programs of BLOCK_G of them when GROUP > BLOCK_G).
    if BLOCK_G == 1:
        bkv = tl.program_id(0)
        gblk = 0
    else:
        bkv = tl.program_id(0) // N_GBLK
        gblk = tl.program_id(0) % N_GBLK
    split = tl.program_id(1)
    b = bkv // H_KV
    hkv = bkv % H_KV
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)
    if USE_PDL:
        # Everything below (q, k, v, cache, positions) may come from the kernels before: wait,
        # then let the out-projection launch and start streaming its weight.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr)  # device scalar: the slot of the new token
    rs_raw = tl.load(rs_ptr + b)
    rs = tl.maximum(rs_raw, 0)
    pos_ok = (pos >= 0) & (pos < S_MAX)

    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < HEAD_DIM  # all true; gives the scalar masks below their (D,) shape
    k_row = k_ptr + b64 * stride_kb + hkv64 * stride_kh
    k_new = tl.load(k_row + offs_d, mask=d_ok, other=0.0)
    v_new = tl.load(v_ptr + b64 * stride_vb + hkv64 * stride_vh + offs_d, mask=d_ok, other=0.0)
    if ROPE:
        # Rotary embedding at position cache_pos - row_start (clamped >= 0), in float32, rounded
        # once to the cache dtype: the cache holds rotated keys.
        cos, sin, partner = _rope_tables(rope_ptr, tl.maximum(pos - rs_raw, 0), HEAD_DIM)
        k_rot = k_new.to(tl.float32) * cos + tl.load(k_row + partner).to(tl.float32) * sin
        k_new = k_rot.to(k_new.dtype)

    cache_off = bkv.to(tl.int64) * S_MAX * HEAD_DIM
    kc_base = kc_ptr + cache_off
    vc_base = vc_ptr + cache_off

    # Cached keys of this chunk: slots [max(chunk_lo, row_start), min(chunk_hi, cache_pos, S_max)).
    # The slot cache_pos itself is taken from registers below, never read from memory.
    chunk_lo = split * CHUNK
    lo = tl.maximum(chunk_lo, rs)
    hi = tl.minimum(tl.minimum(chunk_lo + CHUNK, pos), S_MAX)
    start = chunk_lo + ((lo - chunk_lo) // BLOCK_N) * BLOCK_N  # BLOCK_N-aligned within the chunk
    # The new token: only the split owning slot cache_pos uses it and stores it into the cache.
    owner = pos_ok & (pos >= chunk_lo) & (pos < chunk_lo + CHUNK)
    new_ok = owner & (pos >= rs)
    new_slot = tl.where(owner, pos, 0).to(tl.int64) * HEAD_DIM  # in-bounds address even when masked
    active = chunk_lo <= pos  # the combine reads this split's partials

    if BLOCK_G == 1:
        # One query head per K/V head (GPT-2): a (D,) query, no dot, elementwise score sums.
        q_row = q_ptr + b64 * stride_qb + hkv64 * stride_qh
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0)
        if ROPE:
            q_rot = q.to(tl.float32) * cos + tl.load(q_row + partner).to(tl.float32) * sin
            q = q_rot.to(q.dtype)
        q = q.to(tl.float32) * qk_scale  # (D,) fp32; scores come out already in log2 units
        m_i, l_i, acc = _attend_one_head(q, k_new, v_new, kc_base, vc_base, start, lo, hi, new_ok, HEAD_DIM, BLOCK_N)
        tl.store(kc_base + new_slot + offs_d, k_new, mask=d_ok & owner)
        tl.store(vc_base + new_slot + offs_d, v_new, mask=d_ok & owner)

        if normalize != 0:
            # One split covers the whole cache: normalise and write the output here (a runtime
            # branch, not a constexpr, so every case shares one compiled kernel).
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)
            o = tl.where(pos_ok, o, float("nan"))
            tl.store(out_ptr + b64 * stride_ob + hkv64 * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
        else:
            part = bkv * N_SPLIT + split
            tl.store(m_part_ptr + part, m_i, mask=active)
            tl.store(l_part_ptr + part, l_i, mask=active)
            tl.store(o_part_ptr + part.to(tl.int64) * HEAD_DIM + offs_d, acc, mask=d_ok & active)
    else:
        # Grouped query heads: a (BLOCK_G, D) query block (GROUP rows, zero-padded to >= 16 for
        # tl.dot); each K/V tile is read once for the whole group.
        offs_g = gblk * BLOCK_G + tl.arange(0, BLOCK_G)  # this program's rows of the group
        g_ok = offs_g < GROUP
        heads = hkv64 * GROUP + offs_g  # (BLOCK_G,) int64 query heads (padded rows: unused)
        q_rows = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh  # (BLOCK_G, 1)
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)  # (BLOCK_G, D)
        if ROPE:
            q_partner = tl.load(q_rows + partner[None, :], mask=g_ok[:, None], other=0.0)
            q_rot = q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]
            q = q_rot.to(q.dtype)

        m_i, l_i, acc = _attend_group(
            q, k_new, v_new, kc_base, vc_base, start, lo, hi, new_ok, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_G, IEEE, UPCAST
        )
        writer = owner & (gblk == 0)  # one program per K/V head stores the new token
        tl.store(kc_base + new_slot + offs_d, k_new, mask=d_ok & writer)
        tl.store(vc_base + new_slot + offs_d, v_new, mask=d_ok & writer)

        if normalize != 0:
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            o = tl.where(pos_ok, o, float("nan"))
            out_rows = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh
            tl.store(out_rows + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:
            part = (b64 * H_KV * GROUP + heads) * N_SPLIT + split  # (BLOCK_G,): per query head
            tl.store(m_part_ptr + part, m_i, mask=g_ok & active)
            tl.store(l_part_ptr + part, l_i, mask=g_ok & active)
            tl.store(o_part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & active)


@triton.jit(do_not_specialize=["H", "S_MAX", "CHUNK", "N_SPLIT"])
def _decode_combine_kernel(
    o_part_ptr,
    m_part_ptr,
    l_part_ptr,
    pos_ptr,
    out_ptr,
    H,
    S_MAX,
    CHUNK,
    N_SPLIT,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    # (No active split for an out-of-range cache_pos: the output is NaN then.)
    n_active, pos_ok = _active_splits(tl.load(pos_ptr), S_MAX, CHUNK, N_SPLIT)
    part0 = bh * N_SPLIT
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)

    # Pass 1: global running max M.
    big = tl.max(tl.full([SPLIT_BLOCK], _NEG_BIG, tl.float32), 0)
    m_max = big
    for s0 in range(0, n_active, SPLIT_BLOCK):
        s_ok = (s0 + offs_s) < n_active
        m = tl.load(m_part_ptr + part0 + s0 + offs_s, mask=s_ok, other=_NEG_BIG)
        m_max = tl.maximum(m_max, tl.max(m, 0))
    # Pass 2: acc = sum_s 2^(m_s - M) acc_s, l = sum_s 2^(m_s - M) l_s.
    l_tot = tl.sum(tl.zeros([SPLIT_BLOCK], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, n_active, SPLIT_BLOCK):
        s_ok = (s0 + offs_s) < n_active
        m = tl.load(m_part_ptr + part0 + s0 + offs_s, mask=s_ok, other=_NEG_BIG)
        l = tl.load(l_part_ptr + part0 + s0 + offs_s, mask=s_ok, other=0.0)
        w = tl.where(s_ok, tl.exp2(m - m_max), 0.0)  # (SPLIT_BLOCK,)
        o = tl.load(
            o_part_ptr + (part0 + s0 + offs_s).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None],
            other=0.0,
        )  # (SPLIT_BLOCK, D)
        l_tot += tl.sum(w * l, 0)
        acc += tl.sum(w[:, None] * o, 0)
    o = acc / tl.where(l_tot > 0.0, l_tot, 1.0)  # no valid slot (pad query): 0
    o = tl.where(pos_ok, o, float("nan"))
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


# The autotuned split kernel (the interpreter calls the raw kernel with one fixed config instead):
# one tuner per path over the same kernel, GPT-2's per-head configs and the grouped ones.
# The tuner adds every tensor argument's dtype to the key by itself.
def _prune_decode_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: only the tiles :func:`decode_configs_for` allows at this head_dim."""
    return [c for c in configs if c.kwargs["BLOCK_N"] * kwargs["HEAD_DIM"] <= DECODE_MAX_TILE]


def _prune_decode_group_configs(configs, named_args, **kwargs):
    """The group tuner's early prune: :func:`decode_group_configs_for` at this head_dim, dtype, block."""
    q = named_args.get("q_ptr")
    allowed = decode_group_configs_for(kwargs["HEAD_DIM"], q.dtype if q is not None else torch.float32)
    return [c for c in configs if dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) in allowed]


_decode_split_tuned = triton.autotune(
    configs=_triton_configs(DECODE_CONFIGS), key=["HEAD_DIM", "CHUNK", "N_SPLIT", "ROPE"], do_bench=_tune_bench,
    prune_configs_by={"early_config_prune": _prune_decode_configs},
)(_decode_split_kernel)

_decode_group_tuned = triton.autotune(
    configs=_triton_configs(DECODE_GROUP_CONFIGS), key=["HEAD_DIM", "CHUNK", "N_SPLIT", "ROPE"],
    do_bench=_tune_bench, prune_configs_by={"early_config_prune": _prune_decode_group_configs},
)(_decode_split_kernel)


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
def decode_num_splits(batch: int, n_head: int, max_len: int, *, n_kv_head: int | None = None) -> int:
    """Number of KV chunks flash-decoding uses for a cache of this shape (never depends on the position).

    One split program runs per (row, K/V head, chunk): ``batch * n_kv_head * n_split`` programs
    (``n_kv_head`` defaults to ``n_head``, no grouping). Halve the chunk, starting from the whole
    cache, until about ``DECODE_TARGET_PROGRAMS`` split programs exist or the chunk reaches
    ``DECODE_MIN_CHUNK`` slots.
    """
    if batch < 1 or n_head < 1 or max_len < 1:
        raise ValueError(f"batch, n_head and max_len must be >= 1, got {batch}, {n_head}, {max_len}")
    n_kv_head = _check_kv_heads(n_head, n_kv_head)
    chunk = _next_pow2(max_len)
    while chunk > DECODE_MIN_CHUNK and batch * n_kv_head * triton.cdiv(max_len, chunk) < DECODE_TARGET_PROGRAMS:
        chunk //= 2
    return triton.cdiv(max_len, chunk)


def _check_kv_heads(n_head: int, n_kv_head: int | None) -> int:
    if n_kv_head is None:
        return n_head
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, int) or n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_kv_head must be a positive int dividing n_head={n_head}, got {n_kv_head!r}")
    return n_kv_head


def decode_chunk(max_len: int, n_split: int) -> int:
    """Slots per split: the power of two ``>= ceil(max_len / n_split)`` (at least 16)."""
    return max(_next_pow2(triton.cdiv(max_len, n_split)), 16)


def decode_workspace(
    batch: int,
    n_head: int,
    head_dim: int,
    max_len: int,
    device: torch.device | str,
    *,
    n_split: int | None = None,
    n_kv_head: int | None = None,
) -> dict[str, torch.Tensor]:
    """Preallocate the flash-decoding split partials for a cache of this shape (once, with the cache).

    Parameters
    ----------
    batch, n_head, head_dim, max_len : ``B``, the number of QUERY heads ``H`` (the partials are
        per query head), ``D``, the cache's ``S_max``.
    device : where the cache lives.
    n_split : number of KV chunks; default :func:`decode_num_splits` (tests use it to force
        several splits on small caches). Must be in ``[1, max_len]``.
    n_kv_head : the cache's K/V heads ``H_kv`` (grouped-query attention); only the default split
        count depends on it (the split programs are per K/V head). Default ``n_head``.

    Returns
    -------
    dict[str, torch.Tensor]
        ``"attn_o"``: (B, H, n_split, D) float32 unnormalised partial outputs;
        ``"attn_m"``, ``"attn_l"``: (B, H, n_split) float32 running max (log2 units) and sum.
        The keys are prefixed so the dict can be merged into ``KVCache.workspace``.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if n_split is None:
        if n_kv_head is None:
            n_split = decode_num_splits(batch, n_head, max_len)
        else:
            n_split = decode_num_splits(batch, n_head, max_len, n_kv_head=n_kv_head)
    else:
        _check_kv_heads(n_head, n_kv_head)
    if not 1 <= n_split <= max_len:
        raise ValueError(f"n_split must be in [1, max_len={max_len}], got {n_split}")
    device = torch.device(device)
    return {
        "attn_o": torch.empty((batch, n_head, n_split, head_dim), dtype=torch.float32, device=device),
        "attn_m": torch.empty((batch, n_head, n_split), dtype=torch.float32, device=device),
        "attn_l": torch.empty((batch, n_head, n_split), dtype=torch.float32, device=device),
    }


def _check_workspace(workspace, B: int, H: int, D: int, S_max: int, device) -> int:
    if not isinstance(workspace, dict):
        raise TypeError(f"workspace must be the dict from decode_workspace(), got {type(workspace).__name__}")
    for key in ("attn_o", "attn_m", "attn_l"):
        if key not in workspace:
            raise ValueError(f"workspace is missing {key!r}: build it with decode_workspace()")
    o, m, l = workspace["attn_o"], workspace["attn_m"], workspace["attn_l"]
    check_tensor(o, "workspace['attn_o']", ndim=4, dtypes=(torch.float32,), device=device)
    n_split = o.shape[2]
    if tuple(o.shape) != (B, H, n_split, D) or not o.is_contiguous():
        raise ValueError(f"workspace['attn_o'] must be contiguous (B={B}, H={H}, n_split, D={D}), got {tuple(o.shape)}")
    if not 1 <= n_split <= S_max:
        raise ValueError(f"workspace n_split must be in [1, S_max={S_max}], got {n_split}")
    for name, t in (("workspace['attn_m']", m), ("workspace['attn_l']", l)):
        check_tensor(t, name, ndim=3, dtypes=(torch.float32,), device=device)
        if tuple(t.shape) != (B, H, n_split) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous ({B}, {H}, {n_split}), got {tuple(t.shape)}")
    return n_split


#: (device, dtype, head_dim, chunk, n_split, pdl, grouped, rope) keys the decode autotuners have
#: resolved (capture guard).
_decode_tuned_keys: set = set()


@dataclass(frozen=True)
class AttentionPartials:
    """A decode step's attention output left as per-split partials (``decode_attention(...,
    combine=False)``), for a kernel that combines them on the fly (``kernels.linear.linear(...,
    attn_partials=...)``).

    ``o`` (B, H, n_split, D), ``m``, ``l`` (B, H, n_split) float32: the workspace tensors, valid
    for the splits whose chunk starts at or before ``cache_pos`` (read on the device; the others
    hold stale values that are never read). ``chunk`` slots per split, ``max_len`` = S_max.
    ``rows`` is a (B, 1, H*D) view of the query in the output's dtype: it gives the combined
    output's shape, dtype and device and is never read as data.
    """

    o: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    cache_pos: torch.Tensor
    chunk: int
    max_len: int
    rows: torch.Tensor

    @property
    def n_split(self) -> int:
        return self.o.shape[2]

    @property
    def n_head(self) -> int:
        return self.o.shape[1]

    @property
    def head_dim(self) -> int:
        return self.o.shape[3]


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_pos: torch.Tensor,
    row_start: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    combine: bool = True,
    rope: torch.Tensor | None = None,
) -> torch.Tensor | AttentionPartials:
    """Append one token's ``k, v`` at device slot ``cache_pos`` and attend to ``[row_start, cache_pos]``.

    CUDA-graph safe once warmed up (see the module docstring): the launch configuration depends
    on shapes only, ``cache_pos`` is read on the device, nothing is allocated when ``out`` is given.

    Parameters
    ----------
    q : (B, 1, H, D), float16/bfloat16/float32, last dimension contiguous.
    k, v : (B, 1, H_kv, D), q's dtype, last dimension contiguous; ``H_kv`` divides ``H`` (query
        head ``h`` reads K/V head ``h // (H / H_kv)``).
    k_cache, v_cache : (B, H_kv, S_max, D) contiguous; slot ``cache_pos`` is written.
    cache_pos : (1,) int32 device tensor, the slot of the new token (same for every row), which
        must be in ``[0, S_max)`` (not checkable on the host; out of range gives a NaN output and
        no cache write).
    row_start : (B,) int32 device tensor, first valid slot of each row.
    workspace : :func:`decode_workspace` ``(B, H, D, S_max)`` partials (H query heads).
    out : optional (B, 1, H, D) destination, last dimension contiguous (``combine=True`` only).
    combine : True: the output, normalised (one launch, plus a combine launch when the
        workspace has several splits). False: one launch that only writes the partials of
        ``workspace`` (whatever its split count), returned as :class:`AttentionPartials` for
        the next kernel to combine.
    rope : None, or the (D/2,) float32 contiguous rotary inverse frequencies: q and the new k are
        rotated (rotate-half) at position ``cache_pos - row_start[b]`` (clamped >= 0) before the
        scores and before k is written into the cache (:func:`fastgpt.reference.apply_rope`).

    Returns
    -------
    torch.Tensor or AttentionPartials
        (B, 1, H, D) in q's dtype; zeros for rows whose ``row_start > cache_pos``. With
        ``combine=False``, the partials that combine to it.
    """
    B, T, H, D, S_max = _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode=True, rope=rope)
    check_tensor(cache_pos, "cache_pos", ndim=1, dtypes=(torch.int32,), device=q.device)
    if cache_pos.shape[0] != 1:
        raise ValueError(f"cache_pos must have shape (1,), got {tuple(cache_pos.shape)}")
    n_split = _check_workspace(workspace, B, H, D, S_max, q.device)
    if B * H * n_split > _INT32_MAX or n_split > 65535:
        raise ValueError(f"batch * n_head * n_split must be < 2**31 and n_split <= 65535, got {B * H}, {n_split}")
    if not isinstance(combine, bool):
        raise TypeError(f"combine must be a bool, got {type(combine).__name__}")
    if not combine:
        if out is not None:
            raise ValueError("out must be None with combine=False: the output is left as partials")
        # The kernel's out pointer is never written with normalize=0; q stands in for it.
        _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, q, combine=False, rope=rope)
        note_launch("attention_decode", "triton", n_split=n_split, launches=1, combine="deferred")
        return AttentionPartials(
            workspace["attn_o"], workspace["attn_m"], workspace["attn_l"], cache_pos,
            decode_chunk(S_max, n_split), S_max, q.flatten(2),  # (B, 1, H, D) -> (B, 1, H*D)
        )  # fmt: skip
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, rope=rope)
    note_launch("attention_decode", "triton", n_split=n_split, launches=2 if n_split > 1 else 1, combine="kernel")
    return out


def _launch_decode(
    q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config: dict | None = None, *,
    combine: bool = True, rope: torch.Tensor | None = None,
) -> None:
    """Launch the split (+ combine) decode kernels on validated inputs.

    ``config`` (tests only) pins one entry of ``DECODE_CONFIGS`` / ``DECODE_GROUP_CONFIGS``
    instead of the autotuner. ``combine=False``: the split kernel only, writing partials (``out``
    is not written).
    """
    B, _, H, D = q.shape
    H_kv = k.shape[2]
    group = H // H_kv
    block_g = decode_group_block(group)
    n_gblk = triton.cdiv(group, block_g)
    S_max = k_cache.shape[2]
    o_part, m_part, l_part = workspace["attn_o"], workspace["attn_m"], workspace["attn_l"]
    n_split = o_part.shape[2]
    chunk = decode_chunk(S_max, n_split)
    # (B, 1, H, D): the token dimension has size 1, only the batch and head strides matter.
    # Without rope the frequencies are never read: m_part stands in (a float32 pointer, so the
    # kernel's signature is the same either way).
    args = (
        q, k, v, k_cache, v_cache, cache_pos, row_start, m_part if rope is None else rope, o_part, m_part, l_part, out,
        H_kv, group, n_gblk, S_max, chunk, n_split,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        out.stride(0), out.stride(2),
        _LOG2E / math.sqrt(D), int(combine and n_split == 1),
    )
    meta = dict(
        HEAD_DIM=D, BLOCK_G=block_g, ROPE=rope is not None, IEEE=q.dtype == torch.float32,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
    )
    grid = (B * H_kv * n_gblk, n_split)
    use_pdl = pdl_enabled(q.device)
    if config is None and interpreting():
        config = INTERPRETER_DECODE_CONFIG
    if config is not None:
        _decode_split_kernel[grid](
            *args, **meta, BLOCK_N=config["BLOCK_N"], USE_PDL=use_pdl, launch_pdl=use_pdl,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        key = (q.device, q.dtype, D, chunk, n_split, use_pdl, block_g, rope is not None)
        if key not in _decode_tuned_keys and q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode_attention: first call for this cache shape/dtype happens inside CUDA-graph capture, "
                "where Triton cannot autotune or compile. Call warmup_decode(...) or run decode_attention "
                "once eagerly with the same shapes before capturing."
            )
        tuner = _decode_split_tuned if block_g == 1 else _decode_group_tuned
        tuner[grid](*args, **meta, USE_PDL=use_pdl, launch_pdl=use_pdl)
        _decode_tuned_keys.add(key)
    if combine and n_split > 1:
        # Launched without PDL: it starts once the split kernel has completed.
        _decode_combine_kernel[(B * H,)](
            o_part, m_part, l_part, cache_pos, out,
            H, S_max, chunk, n_split, out.stride(0), out.stride(2),
            HEAD_DIM=D, SPLIT_BLOCK=COMBINE_CONFIG["SPLIT_BLOCK"],
            num_warps=COMBINE_CONFIG["num_warps"], num_stages=COMBINE_CONFIG["num_stages"],
        )


def warmup_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_start: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    *,
    rope: torch.Tensor | None = None,
) -> None:
    """Compile and autotune the decode kernels for these shapes, eagerly, before CUDA-graph capture.

    Runs :func:`decode_attention` once with ``cache_pos = S_max - 1`` (the full cache: the
    bandwidth-bound case the tuner should optimise) into a scratch output. Side effect: slot
    ``S_max - 1`` of the caches receives ``k, v``; that slot is always rewritten by the step that
    reaches it before any query reads it, so this is harmless at any point of a generation.
    """
    check_tensor(k_cache, "k_cache", ndim=4)
    check_tensor(q, "q", ndim=4)
    pos = torch.full((1,), k_cache.shape[2] - 1, dtype=torch.int32, device=q.device)
    decode_attention(q, k, v, k_cache, v_cache, pos, row_start, workspace, rope=rope)
