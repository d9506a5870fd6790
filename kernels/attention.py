"""Fused causal attention over the preallocated KV cache: prefill and flash-decoding (Triton).

Semantics are those of :func:`fastgpt.reference.attention`; this module only makes them fast.

Shapes and layout
-----------------
* ``q, k, v``: ``(B, T, H, D)`` views of the fused QKV projection (``qkv.view(B, T, 3, H, D)
  .unbind(2)``): NOT contiguous (row stride ``3*C``, head stride ``D``); only the last dimension
  must be contiguous. The kernels read them through their strides, no copies.
* ``k_cache, v_cache``: ``(B, H, S_max, D)`` contiguous (one layer of :class:`fastgpt.kv_cache.KVCache`).
* ``row_start``: ``(B,)`` int32 on the device; slot ``j`` of row ``b`` is valid when
  ``row_start[b] <= j`` (left padding). A negative value means the same as 0 (no padding).
* output: ``(B, T, H, D)`` in q's dtype, any strides with a contiguous last dimension (``out=`` may
  be a view of a ``(B, T, H*D)`` buffer).
* dtypes: float16, bfloat16, float32 (all inputs the same). head_dim: 64 or 128.

Maths
-----
Query at slot ``i`` of row ``b`` attends to slots ``j`` with ``row_start[b] <= j <= i``::

    o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j           (o_i = 0 when no slot is valid)

computed with the online softmax in base 2: scores are scaled by ``log2(e) / sqrt(D)`` (one
multiply, folded into the scale) so that ``exp(s) = exp2(s * log2 e)``. Running max ``m``, running
sum ``l`` and unnormalised accumulator ``acc`` are kept in float32; a new block of scores ``s``
updates them as ``m' = max(m, max s)``, ``acc = acc * 2^(m - m') + 2^(s - m') V``,
``l = l * 2^(m - m') + sum 2^(s - m')``, and ``o = acc / l`` at the end. ``m`` starts at the
finite ``-1e30`` (not ``-inf``) so that a row whose scores are all masked (``-inf``) never
computes ``-inf - (-inf)``: it keeps ``l = 0`` and outputs 0.

Matmul precision: float16/bfloat16 use tensor cores with float32 accumulation. float32 inputs
use ``input_precision="ieee"`` (true fp32 FMA dots, no TF32): the fp32 path is for accuracy,
and is tested at 1e-3 relative error.

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

Append-then-attend without a race: the slot ``cache_pos`` is read by exactly one program, the
split that owns it (``cache_pos // CHUNK``). That program never reads the slot from memory: it
uses the new ``k, v`` it holds in registers for that slot (one extra online-softmax step) and
it is also the only program that stores them into the cache. Every other split only reads slots
``< cache_pos``, which no program of this launch writes.

``cache_pos`` cannot be checked on the host without a device sync. If it is outside
``[0, S_max)`` nothing is written to the cache and the output is NaN (loud, but no memory fault
and no device assert).

Autotuning
----------
On the GPU, both kernels are autotuned (``PREFILL_CONFIGS`` / ``PREFILL_CONFIGS_FP32`` keyed on
head_dim, dtype and power-of-two buckets of T and B*H; ``DECODE_CONFIGS`` keyed on head_dim,
dtype, chunk length and n_split -- never on ``cache_pos``). Under the Triton interpreter a single
small fixed config is used. Autotuning launches the kernel many times and synchronises, so it must
not happen inside CUDA-graph capture: make one eager :func:`decode_attention` call with the same
shapes before capturing (the usual warm-up), or call :func:`warmup_decode`. A decode call made
during capture whose (dtype, head_dim, chunk, n_split) was never tuned raises a RuntimeError
saying so, instead of breaking the capture. The autotuner times each candidate with a short
L2-flushing benchmark (:func:`_tune_bench`) so that a new shape bucket costs milliseconds, not
seconds. Integer sizes are excluded from Triton's value specialisation (``do_not_specialize``), so
new sizes never recompile.

Interpreter notes (CPU tests only; compiled kernels are unaffected)
-----------------------------------------------------------------------
* Triton 3.6's interpreter cannot take tensor loop bounds under numpy >= 2.4; this module patches
  that on import when ``TRITON_INTERPRET=1`` (:func:`kernels.utils.fix_interpreter_loop_bounds`).
* Its bfloat16 ``tl.dot`` multiplies raw bit patterns, so under the interpreter bfloat16 operands
  are widened to float32 before the dot (``UPCAST``; the same exact products the tensor cores form).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import check_tensor, interpreting, triton_usable_on

__all__ = [
    "prefill_attention",
    "decode_attention",
    "decode_workspace",
    "decode_num_splits",
    "decode_chunk",
    "warmup_decode",
    "PREFILL_CONFIGS",
    "PREFILL_CONFIGS_FP32",
    "DECODE_CONFIGS",
    "COMBINE_CONFIG",
    "INTERPRETER_PREFILL_CONFIG",
    "INTERPRETER_DECODE_CONFIG",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)

_LOG2E = 1.4426950408889634
#: Finite "minus infinity" for running maxima (see the module docstring).
_NEG_BIG = tl.constexpr(-1.0e30)
_INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------
# Configurations: every (kernel, config) the autotuner may pick (the compile test iterates these).
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
#: Decode split-kernel configs (BLOCK_N = keys per inner tile). The decode loop's loads do not
#: feed a dot, so Triton does not software-pipeline them: memory parallelism comes from many
#: resident programs (small num_warps) and wide tiles, not from num_stages.
DECODE_CONFIGS: list[dict] = [
    dict(BLOCK_N=32, num_warps=2, num_stages=1),
    dict(BLOCK_N=64, num_warps=4, num_stages=1),
    dict(BLOCK_N=128, num_warps=8, num_stages=1),
]
#: The combine kernel is not tuned (a few microseconds of work).
COMBINE_CONFIG: dict = dict(SPLIT_BLOCK=32, num_warps=4, num_stages=1)
#: Single configs used under the Triton interpreter (autotuning there would run every config).
INTERPRETER_PREFILL_CONFIG: dict = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
INTERPRETER_DECODE_CONFIG: dict = dict(BLOCK_N=16, num_warps=4, num_stages=1)

#: Flash-decoding split heuristic: aim for about this many split programs (~8 per SM on a
#: 132-SM H100, so the tail of the last wave is small), with chunks of at least this many slots.
DECODE_TARGET_PROGRAMS = 1024
DECODE_MIN_CHUNK = 128


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _bucket(n: int, lo: int, hi: int) -> int:
    """Power-of-two bucket of ``n`` clamped to ``[lo, hi]`` (autotune keys)."""
    return min(max(_next_pow2(n), lo), hi)


#: Per-device scratch the autotuner's benchmark zeroes before each timed call (see _tune_bench).
_tune_flush: dict = {}


def _tune_bench(fn, quantiles=None):
    """Time one autotune candidate: ``fn`` launches the kernel with that config.

    Like Triton's default ``do_bench`` (each timed call preceded by a memset that evicts the L2 and
    keeps the GPU busy while the CPU enqueues the launch, so events time the kernel, not the
    launch overhead) but capped at ~2 ms of repetitions per config and a 64 MiB flush buffer:
    the default (25 ms warm-up + 100 ms, 256 MiB memset per call) makes the first call of every
    new shape bucket take about a second per kernel.
    """
    fn()  # compiles on the first call; never timed
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    flush = _tune_flush.get(device)
    if flush is None:
        flush = _tune_flush[device] = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    n = int(min(max(2.0 / estimate_ms, 5), 40))
    events = []
    for _ in range(n):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    if quantiles is None:
        return times[len(times) // 2]
    return [times[min(int(q * len(times)), len(times) - 1)] for q in quantiles]


def _triton_configs(configs: list[dict]) -> list[triton.Config]:
    out = []
    for c in configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


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


# --------------------------------------------------------------------------------------------
# Decode kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "S_MAX", "CHUNK", "N_SPLIT"])
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
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
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

    if N_SPLIT == 1:
        # One split covers the whole cache: normalise and write the output here (a runtime branch,
        # not a constexpr, so both cases share one compiled kernel).
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)
        o = tl.where(pos_ok, o, float("nan"))
        tl.store(out_ptr + b64 * stride_ob + h64 * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        # Partials of the splits the combine kernel reads (chunk starts at or before cache_pos).
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
    pos = tl.load(pos_ptr)
    pos_ok = (pos >= 0) & (pos < S_MAX)
    # Splits 0 .. cache_pos // CHUNK wrote partials (splits with no valid slot wrote m=-1e30, l=0).
    # (None for an out-of-range cache_pos: the output is NaN then.)
    n_active = tl.where(pos_ok, tl.minimum(tl.maximum(pos, 0) // CHUNK + 1, N_SPLIT), 0)
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


# Autotuned wrappers (the interpreter calls the raw kernels with one fixed config instead).
# The tuner adds every tensor argument's dtype to the key by itself.
_prefill_tuned = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS), key=["HEAD_DIM", "T_BUCKET", "BH_BUCKET"], do_bench=_tune_bench
)(_prefill_kernel)
_prefill_tuned_fp32 = triton.autotune(
    configs=_triton_configs(PREFILL_CONFIGS_FP32), key=["HEAD_DIM", "T_BUCKET", "BH_BUCKET"], do_bench=_tune_bench
)(_prefill_kernel)
_decode_split_tuned = triton.autotune(
    configs=_triton_configs(DECODE_CONFIGS), key=["HEAD_DIM", "CHUNK", "N_SPLIT"], do_bench=_tune_bench
)(_decode_split_kernel)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode: bool):
    """Shared launcher checks; returns (B, T, H, D, S_max). Raises before any kernel runs."""
    check_tensor(q, "q", ndim=4, dtypes=SUPPORTED_DTYPES, last_dim_contiguous=True)
    device = q.device
    if not triton_usable_on(device):
        raise ValueError(
            f"q is on {device}: the Triton attention kernels need a CUDA tensor "
            "(or a CPU tensor with TRITON_INTERPRET=1 set before importing kernels)"
        )
    B, T, H, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim (q.shape[3]) must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if B < 1 or H < 1 or T < 1:
        raise ValueError(f"q must have batch, seq_len and n_head >= 1, got shape {tuple(q.shape)}")
    if decode and T != 1:
        raise ValueError(f"decode_attention takes one token per row: q must be (B, 1, H, D), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, ndim=4, dtypes=(q.dtype,), device=device, last_dim_contiguous=True)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, ndim=4, dtypes=(q.dtype,), device=device)
        if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"{name} must be (B={B}, H={H}, S_max, D={D}), got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (B, H, S_max, D), got strides {t.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    S_max = k_cache.shape[2]
    if S_max < 1:
        raise ValueError(f"k_cache must have S_max >= 1, got {tuple(k_cache.shape)}")
    if T > S_max:
        raise ValueError(f"q has T={T} tokens but the cache holds only S_max={S_max} slots")
    check_tensor(row_start, "row_start", ndim=1, dtypes=(torch.int32,), device=device)
    if row_start.shape[0] != B:
        raise ValueError(f"row_start must have shape ({B},), got {tuple(row_start.shape)}")
    if not row_start.is_contiguous():
        raise ValueError("row_start must be contiguous")
    if out is not None:
        check_tensor(out, "out", ndim=4, dtypes=(q.dtype,), device=device, last_dim_contiguous=True)
        if out.shape != q.shape:
            raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    # In-slab offsets are int32 (the batch/head bases are int64): bound them.
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t is not None and (T - 1) * t.stride(1) + D > _INT32_MAX:
            raise ValueError(f"{name}: (T - 1) * stride(1) must fit in int32, got T={T}, stride {t.stride(1)}")
    if S_max * D > _INT32_MAX:
        raise ValueError(f"k_cache: S_max * D must fit in int32, got {S_max} * {D}")
    return B, T, H, D, S_max


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
) -> torch.Tensor:
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
    out : optional (B, 1, H, D) destination, last dimension contiguous.

    Returns
    -------
    torch.Tensor
        (B, 1, H, D) in q's dtype; zeros for rows whose ``row_start > cache_pos``.
    """
    B, T, H, D, S_max = _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode=True)
    check_tensor(cache_pos, "cache_pos", ndim=1, dtypes=(torch.int32,), device=q.device)
    if cache_pos.shape[0] != 1:
        raise ValueError(f"cache_pos must have shape (1,), got {tuple(cache_pos.shape)}")
    n_split = _check_workspace(workspace, B, H, D, S_max, q.device)
    if B * H * n_split > _INT32_MAX or n_split > 65535:
        raise ValueError(f"batch * n_head * n_split must be < 2**31 and n_split <= 65535, got {B * H}, {n_split}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out)
    return out


def _launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config: dict | None = None) -> None:
    """Launch the split (+ combine) decode kernels on validated inputs.

    ``config`` (tests only) pins one entry of ``DECODE_CONFIGS`` instead of the autotuner.
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
        _LOG2E / math.sqrt(D),
    )
    grid = (B * H, n_split)
    if config is None and interpreting():
        config = INTERPRETER_DECODE_CONFIG
    if config is not None:
        _decode_split_kernel[grid](
            *args, HEAD_DIM=D, BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        key = (q.device, q.dtype, D, chunk, n_split)
        if key not in _decode_tuned_keys and q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode_attention: first call for this cache shape/dtype happens inside CUDA-graph capture, "
                "where Triton cannot autotune or compile. Call warmup_decode(...) or run decode_attention "
                "once eagerly with the same shapes before capturing."
            )
        _decode_split_tuned[grid](*args, HEAD_DIM=D)
        _decode_tuned_keys.add(key)
    if n_split > 1:
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
