"""Shared parts of the fused causal attention kernels (prefill: :mod:`.attention_prefill`,
decode: :mod:`.attention_decode`): layout, maths, input checks, the autotuner's benchmark.

Semantics are those of :func:`fastgpt.reference.attention`; these modules only make them fast.

Shapes and layout
-----------------
* ``q``: ``(B, T, H, D)``; ``k, v``: ``(B, T, H_kv, D)`` with ``H % H_kv == 0`` (grouped-query
  attention: query head ``h`` reads K/V head ``h // (H / H_kv)``; ``H_kv == H`` is GPT-2's case).
  Views of the fused QKV projection (GPT-2: ``qkv.view(B, T, 3, H, D).unbind(2)``; LLaMA-family:
  ``qkv.split([H*D, H_kv*D, H_kv*D], -1)``): NOT contiguous (row stride ``(H + 2 H_kv) D``, head
  stride ``D``); only the last dimension must be contiguous. The kernels read them through their
  strides, no copies.
* ``k_cache, v_cache``: ``(B, H_kv, S_max, D)`` contiguous (one layer of :class:`fastgpt.kv_cache.KVCache`).
* ``rope``: None, or the ``(D/2,)`` float32 contiguous rotary inverse frequencies: q and the new
  k are rotated (Hugging Face rotate-half, float32, rounded once) at positions ``slot -
  row_start[b]`` clamped at 0, before the scores and before k is written into the cache, which
  therefore holds rotated keys (:func:`fastgpt.reference.apply_rope`).
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

Autotuning
----------
On the GPU, both kernels are autotuned (``PREFILL_CONFIGS`` / ``PREFILL_CONFIGS_FP32`` keyed on
head_dim, dtype and power-of-two buckets of T and B*H; ``DECODE_CONFIGS`` (one query head per
K/V head) and ``DECODE_GROUP_CONFIGS`` (grouped heads) keyed on head_dim, dtype, chunk length,
n_split and rope on/off -- never on ``cache_pos``). Under the Triton interpreter a single
small fixed config is used. Autotuning launches the kernel many times and synchronises, so it must
not happen inside CUDA-graph capture: make one eager ``decode_attention`` call with the same
shapes before capturing (the usual warm-up), or call ``warmup_decode``. A decode call made
during capture whose (dtype, head_dim, chunk, n_split, grouping, rope) was never tuned raises a RuntimeError
saying so, instead of breaking the capture. The autotuner times each candidate with a short
L2-flushing benchmark (:func:`_tune_bench`) so that a new shape bucket costs milliseconds, not
seconds. Integer sizes are excluded from Triton's value specialisation (``do_not_specialize``), so
new sizes never recompile.

Interpreter notes (CPU tests only; compiled kernels are unaffected)
-----------------------------------------------------------------------
* Triton 3.6's interpreter cannot take tensor loop bounds under numpy >= 2.4; kernels.utils patches
  that on import when ``TRITON_INTERPRET=1`` (:func:`kernels.utils.fix_interpreter_loop_bounds`).
* Its bfloat16 ``tl.dot`` multiplies raw bit patterns, so under the interpreter bfloat16 operands
  are widened to float32 before the dot (``UPCAST``; the same exact products the tensor cores form).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_tensor, triton_usable_on

__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)

_LOG2E = 1.4426950408889634
#: Finite "minus infinity" for running maxima (see the module docstring).
_NEG_BIG = tl.constexpr(-1.0e30)
_INT32_MAX = 2**31 - 1

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
# Validation helpers
# --------------------------------------------------------------------------------------------
def _check_qkv_and_cache(q, k, v, k_cache, v_cache, row_start, out, decode: bool, rope=None):
    """Shared launcher checks; returns (B, T, H, D, S_max) (H: query heads). Raises before any
    kernel runs.

    Grouped-query attention: ``k, v`` are ``(B, T, H_kv, D)`` and the caches ``(B, H_kv, S_max,
    D)`` with ``H % H_kv == 0`` (``H_kv = k.shape[2]``). ``rope``: None or the ``(D/2,)``
    float32 rotary inverse frequencies on q's device, contiguous."""
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
    check_tensor(k, "k", ndim=4, dtypes=(q.dtype,), device=device, last_dim_contiguous=True)
    H_kv = k.shape[2]
    if k.shape[:2] != q.shape[:2] or k.shape[3] != D or H_kv < 1 or H % H_kv:
        raise ValueError(
            f"k must be (B={B}, T={T}, H_kv, D={D}) with H_kv dividing q's {H} heads, got {tuple(k.shape)}"
        )
    check_tensor(v, "v", ndim=4, dtypes=(q.dtype,), device=device, last_dim_contiguous=True)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, ndim=4, dtypes=(q.dtype,), device=device)
        if t.shape[0] != B or t.shape[1] != H_kv or t.shape[3] != D:
            raise ValueError(f"{name} must be (B={B}, H_kv={H_kv}, S_max, D={D}), got {tuple(t.shape)}")
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
    if rope is not None:
        check_tensor(rope, "rope", ndim=1, dtypes=(torch.float32,), device=device)
        if rope.shape[0] != D // 2 or not rope.is_contiguous():
            raise ValueError(f"rope must be the contiguous ({D // 2},) inverse frequencies, got shape {tuple(rope.shape)}")
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


@triton.jit
def _sincos(x):
    """``(sin x, cos x)`` of float32 ``x``: about 1e-7 absolute error for ``|x|`` up to 1e6.

    Cody-Waite reduction ``r = x - j pi/2`` with ``pi/2 = C1 + C2 + C3`` (C1 and C2 of 12
    significant bits, so ``j * C1`` and ``j * C2`` are exact products: with FMAs on the GPU every
    step is exact at any rotary angle; unfused, as the Triton interpreter evaluates ``tl.fma``, for
    ``|x| < 6000``), then minimax polynomials on ``[-pi/4, pi/4]``, picked and signed by the
    quadrant ``j mod 4``. Not ``tl.sin``/``tl.cos``: libdevice's large-argument path keeps a
    local-memory array, a 32-byte stack frame in every kernel that calls it (which the no-spill
    compile check counts). Shared by prefill and decode, so both rotate a key identically.
    """
    j = tl.floor(x * 0.6366197466850281 + 0.5)  # nearest multiple of pi/2
    r = tl.fma(j, -1.57080078125, x)
    r = tl.fma(j, 4.453584551811218e-06, r)
    r = tl.fma(j, 8.705515752716053e-10, r)  # r in [-pi/4, pi/4]
    z = r * r
    s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quadrant = j.to(tl.int32) & 3
    odd = (quadrant & 1) == 1
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, s, c)
    sin = tl.where(quadrant >= 2, -sin, sin)  # quadrants 0..3: s, c, -s, -c
    cos = tl.where((quadrant == 1) | (quadrant == 2), -cos, cos)  # c, -s, -c, s
    return sin, cos


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
