"""Fused causal attention decode over the preallocated KV cache: flash-decoding (Triton).

Shapes, dtypes, the online-softmax maths and the autotuning rules are in
:mod:`fastgpt.kernels.attention_common`; semantics: :func:`fastgpt.reference.attention`.

Decode (:func:`decode_attention`, one new token at device slot ``cache_pos``)
--------------------------------------------------------------------------------
Flash-decoding. The cache length ``S_max`` is cut into ``n_split`` chunks of ``CHUNK`` slots
(a function of the cache shape only, see :func:`decode_num_splits`), grid ``(B*H, n_split)``.
Split program ``s`` computes ``(m_s, l_s, acc_s)`` over the valid slots of
``[s*CHUNK, (s+1)*CHUNK)`` before ``cache_pos``; a combine kernel merges them with
log-sum-exp weights ``2^(m_s - M)``. Programs whose chunk starts after ``cache_pos`` write nothing
and the combine kernel never reads them, so the launch shape never depends on ``cache_pos``
(CUDA-graph safe: ``cache_pos`` is only read on the device). With ``n_split == 1`` the split
kernel normalises and writes the output itself and the combine kernel is not launched.

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

Append-then-attend without a race: the slot ``cache_pos`` is read by exactly one program, the
split that owns it (``cache_pos // CHUNK``). That program never reads the slot from memory: it
uses the new ``k, v`` it holds in registers for that slot (one extra online-softmax step) and
it is also the only program that stores them into the cache. Every other split only reads slots
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
    "COMBINE_CONFIG",
    "INTERPRETER_DECODE_CONFIG",
]

# --------------------------------------------------------------------------------------------
# Configurations: every config the autotuner may pick (the compile test iterates these).
# --------------------------------------------------------------------------------------------
#: Decode split-kernel configs (BLOCK_N = keys per inner tile). The decode loop's loads do not
#: feed a dot, so Triton does not software-pipeline them: memory parallelism comes from many
#: resident programs (small num_warps) and wide tiles, not from num_stages.
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


#: The combine kernel is not tuned (a few microseconds of work).
COMBINE_CONFIG: dict = dict(SPLIT_BLOCK=32, num_warps=4, num_stages=1)
#: The single config used under the Triton interpreter (autotuning there would run every config).
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


@triton.jit(do_not_specialize=["H", "S_MAX", "CHUNK", "N_SPLIT", "normalize"])
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    rs_ptr,
    o_part_ptr,
    m_part_ptr,
    l_part_ptr,
    out_ptr,
    H,
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
    USE_PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    if USE_PDL:
        # Everything below (q, k, v, cache, positions) may come from the kernels before: wait,
        # then let the out-projection launch and start streaming its weight.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr)  # device scalar: the slot of the new token
    rs = tl.maximum(tl.load(rs_ptr + b), 0)
    pos_ok = (pos >= 0) & (pos < S_MAX)

    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < HEAD_DIM  # all true; gives the scalar masks below their (D,) shape
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_new_raw = tl.load(k_ptr + b64 * stride_kb + h64 * stride_kh + offs_d, mask=d_ok, other=0.0)
    v_new_raw = tl.load(v_ptr + b64 * stride_vb + h64 * stride_vh + offs_d, mask=d_ok, other=0.0)
    q = q * qk_scale  # (D,) fp32; scores come out already in log2 units

    cache_off = bh.to(tl.int64) * S_MAX * HEAD_DIM
    kc_base = kc_ptr + cache_off
    vc_base = vc_ptr + cache_off

    # Cached keys of this chunk: slots [max(chunk_lo, row_start), min(chunk_hi, cache_pos, S_max)).
    # The slot cache_pos itself is taken from registers below, never read from memory.
    chunk_lo = split * CHUNK
    lo = tl.maximum(chunk_lo, rs)
    hi = tl.minimum(tl.minimum(chunk_lo + CHUNK, pos), S_MAX)
    start = chunk_lo + ((lo - chunk_lo) // BLOCK_N) * BLOCK_N  # BLOCK_N-aligned within the chunk

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

    # The new token: only the split owning slot cache_pos uses it and stores it into the cache.
    owner = pos_ok & (pos >= chunk_lo) & (pos < chunk_lo + CHUNK)
    s_new = tl.sum(q * k_new_raw.to(tl.float32), 0)
    s_new = tl.where(owner & (pos >= rs), s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha + p_new * v_new_raw.to(tl.float32)
    m_i = m_new
    new_slot = tl.where(owner, pos, 0).to(tl.int64) * HEAD_DIM  # in-bounds address even when masked
    tl.store(kc_base + new_slot + offs_d, k_new_raw, mask=d_ok & owner)
    tl.store(vc_base + new_slot + offs_d, v_new_raw, mask=d_ok & owner)

    if normalize != 0:
        # One split covers the whole cache: normalise and write the output here (a runtime branch,
        # not a constexpr, so every case shares one compiled kernel).
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)
        o = tl.where(pos_ok, o, float("nan"))
        tl.store(out_ptr + b64 * stride_ob + h64 * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        # Partials of the splits the combine reads (chunk starts at or before cache_pos).
        active = chunk_lo <= pos
        part = bh * N_SPLIT + split
        tl.store(m_part_ptr + part, m_i, mask=active)
        tl.store(l_part_ptr + part, l_i, mask=active)
        tl.store(o_part_ptr + part.to(tl.int64) * HEAD_DIM + offs_d, acc, mask=d_ok & active)


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


# The autotuned split kernel (the interpreter calls the raw kernel with one fixed config instead).
# The tuner adds every tensor argument's dtype to the key by itself.
def _prune_decode_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: only the tiles :func:`decode_configs_for` allows at this head_dim."""
    return [c for c in configs if c.kwargs["BLOCK_N"] * kwargs["HEAD_DIM"] <= DECODE_MAX_TILE]


_decode_split_tuned = triton.autotune(
    configs=_triton_configs(DECODE_CONFIGS), key=["HEAD_DIM", "CHUNK", "N_SPLIT"], do_bench=_tune_bench,
    prune_configs_by={"early_config_prune": _prune_decode_configs},
)(_decode_split_kernel)


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
def decode_num_splits(batch: int, n_head: int, max_len: int) -> int:
    """Number of KV chunks flash-decoding uses for a cache of this shape (never depends on the position).

    Halve the chunk, starting from the whole cache, until about ``DECODE_TARGET_PROGRAMS`` split
    programs exist or the chunk reaches ``DECODE_MIN_CHUNK`` slots.
    """
    if batch < 1 or n_head < 1 or max_len < 1:
        raise ValueError(f"batch, n_head and max_len must be >= 1, got {batch}, {n_head}, {max_len}")
    chunk = _next_pow2(max_len)
    while chunk > DECODE_MIN_CHUNK and batch * n_head * triton.cdiv(max_len, chunk) < DECODE_TARGET_PROGRAMS:
        chunk //= 2
    return triton.cdiv(max_len, chunk)


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
) -> dict[str, torch.Tensor]:
    """Preallocate the flash-decoding split partials for a cache of this shape (once, with the cache).

    Parameters
    ----------
    batch, n_head, head_dim, max_len : the KV cache's ``B, H, D, S_max``.
    device : where the cache lives.
    n_split : number of KV chunks; default :func:`decode_num_splits` (tests use it to force
        several splits on small caches). Must be in ``[1, max_len]``.

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
        n_split = decode_num_splits(batch, n_head, max_len)
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


#: (device, dtype, head_dim, chunk, n_split) keys the decode autotuner has resolved (capture guard).
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
) -> torch.Tensor | AttentionPartials:
    """Append one token's ``k, v`` at device slot ``cache_pos`` and attend to ``[row_start, cache_pos]``.

    CUDA-graph safe once warmed up (see the module docstring): the launch configuration depends
    on shapes only, ``cache_pos`` is read on the device, nothing is allocated when ``out`` is given.

    Parameters
    ----------
    q, k, v : (B, 1, H, D), float16/bfloat16/float32, last dimension contiguous.
    k_cache, v_cache : (B, H, S_max, D) contiguous; slot ``cache_pos`` is written.
    cache_pos : (1,) int32 device tensor, the slot of the new token (same for every row), which
        must be in ``[0, S_max)`` (not checkable on the host; out of range gives a NaN output and
        no cache write).
    row_start : (B,) int32 device tensor, first valid slot of each row.
    workspace : :func:`decode_workspace` ``(B, H, D, S_max)`` partials.
    out : optional (B, 1, H, D) destination, last dimension contiguous (``combine=True`` only).
    combine : True: the output, normalised (one launch, plus a combine launch when the
        workspace has several splits). False: one launch that only writes the partials of
        ``workspace`` (whatever its split count), returned as :class:`AttentionPartials` for
        the next kernel to combine.

    Returns
    -------
    torch.Tensor or AttentionPartials
        (B, 1, H, D) in q's dtype; zeros for rows whose ``row_start > cache_pos``. With
        ``combine=False``, the partials that combine to it.
    """
    B, T, H, D, S_max = _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode=True)
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
        _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, q, combine=False)
        note_launch("attention_decode", "triton", n_split=n_split, launches=1, combine="deferred")
        return AttentionPartials(
            workspace["attn_o"], workspace["attn_m"], workspace["attn_l"], cache_pos,
            decode_chunk(S_max, n_split), S_max, q.flatten(2),  # (B, 1, H, D) -> (B, 1, H*D)
        )  # fmt: skip
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out)
    note_launch("attention_decode", "triton", n_split=n_split, launches=2 if n_split > 1 else 1, combine="kernel")
    return out


def _launch_decode(
    q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config: dict | None = None, *, combine: bool = True
) -> None:
    """Launch the split (+ combine) decode kernels on validated inputs.

    ``config`` (tests only) pins one entry of ``DECODE_CONFIGS`` instead of the autotuner.
    ``combine=False``: the split kernel only, writing partials (``out`` is not written).
    """
    B, _, H, D = q.shape
    S_max = k_cache.shape[2]
    o_part, m_part, l_part = workspace["attn_o"], workspace["attn_m"], workspace["attn_l"]
    n_split = o_part.shape[2]
    chunk = decode_chunk(S_max, n_split)
    # (B, 1, H, D): the token dimension has size 1, only the batch and head strides matter.
    args = (
        q, k, v, k_cache, v_cache, cache_pos, row_start, o_part, m_part, l_part, out,
        H, S_max, chunk, n_split,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        out.stride(0), out.stride(2),
        _LOG2E / math.sqrt(D), int(combine and n_split == 1),
    )
    grid = (B * H, n_split)
    use_pdl = pdl_enabled(q.device)
    if config is None and interpreting():
        config = INTERPRETER_DECODE_CONFIG
    if config is not None:
        _decode_split_kernel[grid](
            *args, HEAD_DIM=D, BLOCK_N=config["BLOCK_N"], USE_PDL=use_pdl, launch_pdl=use_pdl,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        key = (q.device, q.dtype, D, chunk, n_split, use_pdl)
        if key not in _decode_tuned_keys and q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode_attention: first call for this cache shape/dtype happens inside CUDA-graph capture, "
                "where Triton cannot autotune or compile. Call warmup_decode(...) or run decode_attention "
                "once eagerly with the same shapes before capturing."
            )
        _decode_split_tuned[grid](*args, HEAD_DIM=D, USE_PDL=use_pdl, launch_pdl=use_pdl)
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
    decode_attention(q, k, v, k_cache, v_cache, pos, row_start, workspace)
