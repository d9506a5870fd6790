"""LayerNorm or RMSNorm with a fused residual add ("add + LN", "add + RMSNorm"), one Triton
program per row.

Maths
-----
For each row of ``C`` features (the last dimension)::

    s = x + residual                      (s = x when there is no residual)
    h = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias        add_layernorm (GPT-2)
    h = round(s / sqrt(mean(s^2) + eps)) * weight                 add_rmsnorm   (the LLaMA family)

LayerNorm: the biased variance ``var(s) = mean((s - mean(s))^2)``, as ``torch.nn.LayerNorm``.
RMSNorm: Hugging Face's ``LlamaRMSNorm`` -- no mean subtraction, no bias, the normalised row
rounded to the dtype (``round``) before the weight multiplies it, the product rounded again. ``s``
is rounded to the input dtype before it is normalised, because that rounded ``s`` is what gets
stored as the new residual stream (and what ``x + residual`` followed by the norm normalises); the
statistics and the normalisation run in float32. The semantics are those of
:func:`fastgpt.reference.add_layernorm` / :func:`fastgpt.reference.add_rmsnorm`. One kernel serves
both (constexpr ``RMS``); the cuBLAS side of the linear ops (prefill, or a plan that chose cuBLAS)
calls these before the product, while the decode GEMVs fuse the norm themselves.

Why it exists: in a pre-norm transformer the residual add of one sub-block and the norm of the
next read and write the same row; fused, the row is read once and both ``s`` (the residual stream)
and ``h`` (the next sub-block's input) are written by one launch instead of three kernels.

Shapes and dtypes
-----------------
* ``x``, ``residual``: ``(..., C)``, float16 / bfloat16 / float32 (the same), any strides as long
  as the leading dimensions flatten to rows with a single row stride (e.g. ``x[:, -1]`` of a
  ``(B, T, C)`` tensor) and the last dimension is contiguous.
* ``weight``, ``bias`` (LayerNorm only): ``(C,)`` contiguous, same dtype. ``C <= MAX_C``.
* outputs ``h`` and ``s``: ``x.shape``, same dtype; ``out=`` / ``residual_out=`` may be
  preallocated. ``residual_out`` may be ``x`` or ``residual`` itself (in place): each program
  reads its whole row before it writes it.

The kernel holds a whole row in registers (``BLOCK_C = next_power_of_2(C)``), so there is no
loop and no second read: GPT-2's widths (768 ... 1600) take 1024 or 2048 slots, the LLaMA
family's (576 ... 4096) 1024 to 4096.

Programmatic dependent launch (:func:`kernels.utils.pdl_enabled`): the norm parameters are
loaded before ``gdc_wait``, the rows (the previous kernels' outputs) after it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_tensor, note_launch, pdl_enabled, triton_usable_on

__all__ = ["MAX_C", "add_layernorm", "add_rmsnorm", "layernorm_num_warps"]

#: The widest row one program normalises (it lives in registers: 16384 fp32 over 16 warps).
MAX_C = 16384

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Rows up to this width load the LayerNorm parameters first (before gdc_wait); wider rows load
#: them after the statistics, where the registers are free again (16384 slots would spill).
EARLY_PARAMS_MAX_C = tl.constexpr(4096)


@triton.jit
def _add_layernorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    s_ptr,
    C,
    stride_x,
    stride_res,
    stride_h,
    stride_s,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
    RMS: tl.constexpr = False,  # RMSNorm (no mean, no bias; b_ptr unused) instead of LayerNorm
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2^31 in a long prefill
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    if BLOCK_C <= EARLY_PARAMS_MAX_C:
        # The parameters are constant: loaded while the previous kernel may still run (PDL).
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if not RMS:
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        s_rounded = (s + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + offs, s_rounded, mask=mask)
        # Normalise the stored (rounded) sum, as the unfused `x + r` then LayerNorm does.
        s = s_rounded.to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / C + eps)  # masked lanes are 0
        if BLOCK_C > EARLY_PARAMS_MAX_C:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # HF LlamaRMSNorm: the normalised row rounded to the dtype, then times the weight.
        h = (s * rstd).to(h_ptr.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(s, axis=0) / C
        centred = tl.where(mask, s - mean, 0.0)  # masked lanes must not enter the variance
        var = tl.sum(centred * centred, axis=0) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        if BLOCK_C > EARLY_PARAMS_MAX_C:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = centred * rstd * w + b
    tl.store(h_ptr + row * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


def layernorm_num_warps(block_c: int) -> int:
    """Warps for a row of ``block_c`` slots: about 8 fp32 values per thread, 1 to 16 warps."""
    return max(1, min(16, block_c // 256))


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``(..., C) -> (M, C)`` as a view with one row stride; ValueError when that needs a copy."""
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")
    if t.dim() == 1:
        return t.view(1, t.shape[0])
    try:
        return t.view(-1, t.shape[-1])  # (..., C) -> (M, C)
    except RuntimeError:
        raise ValueError(
            f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows of "
            f"{t.shape[-1]} features with one row stride; pass a contiguous tensor (or a slice of one)"
        ) from None


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` a (non-negatively strided) tensor can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_rows_disjoint(rows: torch.Tensor, name: str) -> None:
    """ValueError when the rows of an output ``(M, C)`` view overlap each other (e.g. a stride-0
    ``expand``): two programs would write the same elements."""
    if rows.shape[0] > 1 and abs(rows.stride(0)) < rows.shape[1]:
        raise ValueError(f"{name}'s rows overlap in memory (row stride {rows.stride(0)} < {rows.shape[1]} features)")


def check_no_partial_overlap(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, *, may_alias: bool) -> None:
    """Raise ValueError when ``a`` and ``b`` share memory, except exact aliasing if ``may_alias``.

    Exact aliasing (same start, shape and strides) is element-for-element in place; any other
    overlap would let one program overwrite what another still has to read.
    """
    lo_a, hi_a = _span(a)
    lo_b, hi_b = _span(b)
    if lo_a >= hi_b or lo_b >= hi_a:
        return
    same = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    if same and may_alias:
        return
    allowed = " (exact aliasing, for in-place use, is allowed)" if may_alias else ""
    raise ValueError(f"{a_name} must not overlap {b_name} in memory{allowed}")


def add_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual``; ``h = LayerNorm(s) * weight + bias``, in one Triton launch.

    Parameters
    ----------
    x : (..., C) float16 / bfloat16 / float32; rows with one stride, last dimension contiguous.
    weight, bias : (C,) contiguous, x's dtype. ``1 <= C <= MAX_C``.
    eps : > 0, added to the variance.
    residual : (..., C) like ``x``, or None (then ``s`` is ``x`` and only ``h`` is written).
    out : preallocated ``h`` (x's shape and dtype), or None to allocate.
    residual_out : preallocated ``s`` (may be ``x`` or ``residual`` itself: in place), or None to
        allocate; only with ``residual``.

    Returns
    -------
    (h, s) : ``h`` the normalised rows, ``s`` the residual sum (``x`` itself without a residual).
    """
    return _add_norm("add_layernorm", x, weight, bias, eps, residual, out, residual_out)


def add_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual``; ``h = RMSNorm(s) * weight`` (Hugging Face's ``LlamaRMSNorm``), one launch.

    ``h = (s * rsqrt(mean(s^2) + eps))`` in float32, rounded to the dtype, times ``weight``
    (:func:`fastgpt.reference.add_rmsnorm`). Arguments, checks and results as
    :func:`add_layernorm`, without a bias; ``residual`` may also be passed by position.
    """
    return _add_norm("add_rmsnorm", x, weight, None, eps, residual, out, residual_out)


def _add_norm(name, x, weight, bias, eps, residual, out, residual_out) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks and the launch of :func:`add_layernorm` (``bias`` given) / :func:`add_rmsnorm` (None)."""
    rms = bias is None
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    device, dtype, C = x.device, x.dtype, x.shape[-1]
    if not triton_usable_on(device):
        raise ValueError(
            f"{name} runs Triton kernels: x must be on a CUDA device, or on the CPU with "
            f"TRITON_INTERPRET=1 set before kernels are imported; got {device}"
        )
    if C > MAX_C:
        raise ValueError(f"x has C={C} features; {name} supports 1 <= C <= {MAX_C}")
    for t, arg in ((weight, "weight"),) if rms else ((weight, "weight"), (bias, "bias")):
        check_tensor(t, arg, ndim=1, dtypes=(dtype,), device=device)
        if t.shape[0] != C or (C > 1 and t.stride(0) != 1):
            raise ValueError(f"{arg} must be a contiguous ({C},) tensor, got shape {tuple(t.shape)} strides {t.stride()}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    x_rows = as_rows(x, "x")
    M = x_rows.shape[0]

    if residual is not None:
        check_tensor(residual, "residual", dtypes=(dtype,), device=device, last_dim_contiguous=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        res_rows = as_rows(residual, "residual")
        if residual_out is None:
            residual_out = torch.empty_like(x)
        check_tensor(residual_out, "residual_out", dtypes=(dtype,), device=device, last_dim_contiguous=True)
        if residual_out.shape != x.shape:
            raise ValueError(f"residual_out must have x's shape {tuple(x.shape)}, got {tuple(residual_out.shape)}")
        s_rows = as_rows(residual_out, "residual_out")
        check_rows_disjoint(s_rows, "residual_out")
    elif residual_out is not None:
        raise ValueError("residual_out is only written when residual is given (s = x + residual)")
    else:
        res_rows = s_rows = x_rows  # unused by the kernel (HAS_RESIDUAL=False)

    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=device)
    check_tensor(out, "out", dtypes=(dtype,), device=device, last_dim_contiguous=True)
    if out.shape != x.shape:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    h_rows = as_rows(out, "out")
    check_rows_disjoint(h_rows, "out")
    # h is written from a reduction over the whole row, so even out == x would be safe row by row;
    # partial overlaps (other strides) are not.
    check_no_partial_overlap(out, "out", x, "x", may_alias=True)
    if residual is not None:
        check_no_partial_overlap(out, "out", residual, "residual", may_alias=True)
        check_no_partial_overlap(out, "out", residual_out, "residual_out", may_alias=False)
        check_no_partial_overlap(residual_out, "residual_out", x, "x", may_alias=True)
        check_no_partial_overlap(residual_out, "residual_out", residual, "residual", may_alias=True)

    if M > 0:
        block_c = triton.next_power_of_2(C)
        use_pdl = pdl_enabled(device)
        _add_layernorm_kernel[(M,)](
            x_rows, res_rows, weight, weight if rms else bias, h_rows, s_rows,
            C, x_rows.stride(0), res_rows.stride(0), h_rows.stride(0), s_rows.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_C=block_c, USE_PDL=use_pdl, RMS=rms, launch_pdl=use_pdl,
            num_warps=layernorm_num_warps(block_c),
        )  # fmt: skip
    note_launch("layernorm", "triton", residual=residual is not None, norm="rmsnorm" if rms else "layernorm")
    return out, (residual_out if residual is not None else x)
