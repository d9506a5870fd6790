"""Token + position embedding in one Triton launch: ``x[b, t] = wte[ids[b, t]] + wpe[pos[b, t]]``.

Maths
-----
The slot of token ``t`` of row ``b`` in the KV cache is ``cache_pos + t`` (``cache_pos`` the
``(1,)`` device position of the next slot); a left-padded row's first real token is position 0,
so ``pos[b, t] = max(cache_pos + t - row_start[b], 0)`` (pad slots get position 0, as
:meth:`fastgpt.GPT.embed_parts`). The sum is computed in float32 and rounded once to the weights'
dtype: exactly what ``wte(ids) + wpe(pos)`` computes in PyTorch (an fp16 add rounds the float32
sum), so the first LayerNorm sees the same residual stream as the unfused model.

Why it exists: the decode step reads its token from the device input buffer and its position from
the cache's device position, so the embedding is one launch instead of five (position arithmetic,
two gathers, the add) and needs nothing from the host -- CUDA-graph capturable.

Shapes and dtypes
-----------------
* ``ids``: ``(B, T)`` int64 (or int32), any strides. An id outside ``[0, vocab)`` cannot be
  checked without a host sync: its row is written as NaN (visible, never an out-of-bounds read).
* ``wte``: ``(vocab, C)``, ``wpe``: ``(n_positions, C)``, contiguous rows, same float dtype.
  A position ``>= n_positions`` gives a NaN row the same way.
* ``cache_pos``: ``(1,)`` int32; ``row_start``: ``(B,)`` int32.
* output ``(B, T, C)`` in the weights' dtype (``out=`` may be preallocated, contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_tensor, interpreting, note_launch, pdl_enabled, triton_usable_on

__all__ = ["embed", "BLOCK_C"]

#: Features per program (a row of C features is split over ``ceil(C / BLOCK_C)`` programs).
BLOCK_C = 1024


@triton.jit
def _embedding_kernel(
    ids_ptr, stride_ib, stride_it, T,
    wte_ptr, n_vocab, wpe_ptr, n_pos,
    cache_pos_ptr, row_start_ptr,
    out_ptr, C,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (row ``b * T + t``, feature block ``f``): one token's embedding slice."""
    bt = tl.program_id(0)
    f = tl.program_id(1)
    b = bt // T
    t = bt % T
    cols = f * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    if USE_PDL:
        # The ids and the cache position are written by the previous step's sampler.
        tl.extra.cuda.gdc_wait()
    token = tl.load(ids_ptr + b.to(tl.int64) * stride_ib + t * stride_it).to(tl.int64)
    pos = tl.maximum(tl.load(cache_pos_ptr) + t - tl.load(row_start_ptr + b), 0).to(tl.int64)
    ok = (token >= 0) & (token < n_vocab) & (pos < n_pos)
    tok_row = tl.where(ok, token, 0)
    pos_row = tl.where(ok, pos, 0)
    w = tl.load(wte_ptr + tok_row * C + cols, mask=cmask, other=0.0).to(tl.float32)
    p = tl.load(wpe_ptr + pos_row * C + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.where(ok, w + p, float("nan"))
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + bt.to(tl.int64) * C + cols, x.to(out_ptr.dtype.element_ty), mask=cmask)


def embed(
    ids: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    cache_pos: torch.Tensor,
    row_start: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``wte[ids] + wpe[positions]`` ``(B, T, C)`` with the positions of the KV cache's slots.

    Parameters
    ----------
    ids : (B, T) int64/int32 token ids (e.g. a view of the decode step's input buffer).
    wte : (vocab, C) token embedding; wpe : (n_positions, C) position embedding, same dtype.
    cache_pos : (1,) int32, the cache slot of ``ids[:, 0]``.
    row_start : (B,) int32 left-pad counts.
    out : optional contiguous (B, T, C) destination in the weights' dtype.

    One launch, no host sync, no allocation with ``out``: CUDA-graph capturable.
    """
    check_tensor(ids, "ids", ndim=2, dtypes=(torch.int64, torch.int32))
    dev = ids.device
    if not triton_usable_on(dev):
        raise RuntimeError(
            f"kernels.embedding.embed needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}"
        )
    B, T = ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"ids must have at least one row and one token, got shape {tuple(ids.shape)}")
    check_tensor(wte, "wte", ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32), device=dev)
    check_tensor(wpe, "wpe", ndim=2, dtypes=(wte.dtype,), device=dev)
    C = wte.shape[1]
    if wpe.shape[1] != C:
        raise ValueError(f"wpe must have {C} columns as wte, got shape {tuple(wpe.shape)}")
    if not (wte.is_contiguous() and wpe.is_contiguous()):
        raise ValueError("wte and wpe must be contiguous")
    check_tensor(cache_pos, "cache_pos", ndim=1, dtypes=(torch.int32,), device=dev)
    if cache_pos.shape[0] != 1:
        raise ValueError(f"cache_pos must have shape (1,), got {tuple(cache_pos.shape)}")
    check_tensor(row_start, "row_start", ndim=1, dtypes=(torch.int32,), device=dev)
    if row_start.shape[0] != B:
        raise ValueError(f"row_start must have shape ({B},), got {tuple(row_start.shape)}")
    if out is None:
        out = torch.empty((B, T, C), dtype=wte.dtype, device=dev)
    else:
        check_tensor(out, "out", ndim=3, dtypes=(wte.dtype,), device=dev)
        if tuple(out.shape) != (B, T, C) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({B}, {T}, {C}) tensor, got shape {tuple(out.shape)}")
    block = min(BLOCK_C, triton.next_power_of_2(C))
    grid = (B * T, triton.cdiv(C, block))
    use_pdl = pdl_enabled(dev)
    _embedding_kernel[grid](
        ids, ids.stride(0), ids.stride(1), T,
        wte, wte.shape[0], wpe, wpe.shape[0],
        cache_pos, row_start,
        out, C,
        BLOCK=block, USE_PDL=use_pdl, **({"launch_pdl": True} if use_pdl else {}),
    )  # fmt: skip
    note_launch("embedding", "triton", interpreter=interpreting(), pdl=use_pdl)
    return out
