"""Skinny matmul (GEMV) for decode-sized batches, with a fused LayerNorm / RMSNorm prologue and
fused bias, GELU / SwiGLU and residual epilogues (Triton), and the same op on cuBLAS
(:func:`cublas_linear`).

Maths
-----
For ``x`` with ``M = B*T`` rows of ``K`` features and an ``nn.Linear`` weight ``W`` of shape
``(N, K)``::

    a   = norm(x)                                                                     (optional)
        = LN(x)  = (x - mean) / sqrt(var + eps) * ln_weight + ln_bias      norm="layernorm" (GPT-2)
        = RMS(x) = round(x / sqrt(mean(x^2) + eps)) * ln_weight            norm="rmsnorm" (LLaMA)
    out = residual + act(a @ W^T + bias)                                              (each optional)

``act`` is GPT-2's tanh GELU (``"gelu_tanh"``: ``0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))``,
computed as the equal ``y * sigmoid(2 u)``, which cannot overflow), the erf GELU (``"gelu"``), or
the LLaMA family's gated SiLU (``"silu_glu"``, below). Semantics: :func:`fastgpt.reference.linear`.
The normalised row is rounded to the input dtype before the product (what a separate norm kernel
would store; RMSNorm as Hugging Face's ``LlamaRMSNorm``: statistics in float32, no mean
subtraction, no bias, the normalised row rounded to the dtype BEFORE the weight multiplies it, and
the product rounded again), then everything accumulates in float32 and is rounded once, when
``out`` is stored. The kernels take the norm as a constexpr ``NORM`` (0 none, 1 LayerNorm,
2 RMSNorm: :data:`NORM_CODES`), so each variant compiles to its own code and GPT-2's is unchanged.

SwiGLU (``activation="silu_glu"``): a LLaMA MLP computes ``silu(x @ G^T) * (x @ U^T)`` with gate and
up weights ``G``, ``U`` of shape ``(F, K)``. Here they are ONE weight ``W`` of shape ``(2F, K)``
with the rows interleaved -- row ``2j`` is ``G[j]``, row ``2j + 1`` is ``U[j]`` (the model layer
builds it once at load time) -- so the kernel runs the ordinary GEMV over ``N = 2F`` and every
(gate, up) pair lands in two adjacent accumulator columns of the same tile (``BLOCK_N`` is even,
tiles never split a pair). The epilogue reshapes the ``(BM, BLOCK_N)`` float32 tile to
``(BM, BLOCK_N/2, 2)``, splits it into gate and up, and stores ``silu(gate) * up`` (float32,
``silu(g) = g / (1 + exp(-g))``: ``-0``, not NaN, when ``exp`` overflows) to ``BLOCK_N/2`` output
columns: the output is ``(..., F = N/2)``. A bias is interleaved the same way and added before the
activation; the residual (if any) has the output's width. With split-K the partials stay in the
N-wide space and the finishing split applies it. Why interleaved rather than ``[G; U]``
stacked: with stacked halves a tile would need two weight tiles ``F`` rows apart (two row
streams, twice the tiles in flight per output); interleaved, each tile is one contiguous block of
rows and the pairing is free.

Why: at batch 1 a decode step is a chain of matrix-vector products, each bound by reading its
weight once. A GEMV must stream ``W`` at close to the copy bandwidth, and the small element-wise
ops around it (LayerNorm / RMSNorm, bias, GELU / SwiGLU, residual add) cost a launch each while
moving almost nothing; here they ride along in the one launch that reads ``W``.

Kernel (``_gemv_kernel``), grid ``(cdiv(N, BLOCK_N), n_split)``
-----------------------------------------------------------------
* Program ``(n, s)`` owns output columns ``[n*BLOCK_N, (n+1)*BLOCK_N)`` for all ``M`` rows and the
  K range ``[s*k_per_split, (s+1)*k_per_split)``. Rows of ``W`` are read along K, contiguous: the
  ``nn.Linear`` layout is the efficient direction, no transpose is ever made.
* ``M == 1`` (``BLOCK_M = 1``): a ``(BLOCK_N, BLOCK_K)`` float32 accumulator takes ``w * x``
  element-wise in the loop and is reduced over K once at the end (no per-iteration shuffles).
  ``2 <= M <= 16`` (``BLOCK_M = 16``): ``tl.dot`` on tensor cores (float32 inputs: ``"ieee"``
  precision, no TF32), rows past ``M`` masked.
* Norm prologue: every program first computes the statistics of its ``M`` rows over the whole of
  K (LayerNorm: mean and variance, two passes, exact like the reference; RMSNorm: the mean of
  squares, one pass; the rows are KBs and come from L1/L2, the weight tile is what costs), then
  normalises each ``x`` chunk just before the product. No program writes the normalised rows: the
  norm's output is never materialised.
* Split-K, for shapes with few column tiles (e.g. ``N = 768``): each split writes its float32
  partial sums to a workspace, then ``bar.sync`` + one ``atom.add.acq_rel.gpu`` on a per-tile
  counter. The split that arrives last (counter == ``n_split - 1``) sums the partials in split
  order (deterministic whatever the arrival order), runs the epilogue, stores ``out`` and resets
  the counter to 0 for the next launch; the others store nothing. One launch, no zero-fill, no
  second kernel. Self-healing: the counters are two rows ``(2, n_tiles)`` and consecutive launches
  alternate rows (the row is a kernel argument; a captured launch keeps its own); the finisher
  clears its tile's counter in *both* rows. A launch that never completes (programs that never
  arrive) or launches racing on one workspace leave a stale count only in their own row: the next
  launch counts in the other, clean row and its finisher clears the stale one, so every later
  launch is exact (``k`` incomplete launches in a row cost at most ``k - 1`` wrong ones). The release (barrier then the releasing atomic, as CUTLASS's semaphore does) and
  the acquire (the atomic, then the partials loaded with ``.cg``, bypassing L1) make every
  partial visible to the finishing program.

Whole-row kernel (``_gemv_row_kernel``): ``M == 1`` and ``K <= ROW_K_MAX`` (GPT-2's 768 / 1600, LLaMA's 576 ... 2048)
--------------------------------------------------------------------------------------------------------------------------
Batch-1 decode is bound by streaming ``W`` once; ``x`` is one row of at most 2048 features. Each
program holds the whole row (``ROW_K = next_power_of_2(K)``: one K chunk, so no K loop, no split-K
handshake, no workspace, and no 256-wide iteration spent on K = 1600's last 64 columns) and
reduces ``(BLOCK_N, ROW_K)`` weight tiles of ``BLOCK_N = 4096 / ROW_K`` rows. One program per tile,
or, when there are more than ``PERSISTENT_MIN_TILES_PER_SM`` tiles per SM (the LM head:
12,565 tiles for GPT-2), persistent: ``PERSISTENT_PROGRAMS_PER_SM`` programs per SM, each
normalising its row ONCE (LayerNorm / RMSNorm statistics and the normalised row stay in
registers) and streaming every G-th tile with the next tile's load in flight. :func:`default_config`
picks it for these shapes (:func:`row_config`: ``BLOCK_N = 4`` rows at K <= 1024, 2 at K <= 2048,
so a silu_glu tile is 2 or 1 output columns); the measured plan weighs it against the K-loop tiles.
The LLaMA hidden sizes 3072 and 4096 (Llama-3.2-3B, 8B, Mistral) and every down projection
(K = F) take the K-loop kernel; the M == 1 statistics then come from one ``LN_ROW = 4096`` load.

Attention combine prologue (``attn_partials=``)
-----------------------------------------------
In a decode step the out-projection's ``x`` is the attention output. With
``decode_attention(..., combine=False)`` that output is left as per-split partials and this GEMV
combines them for the K columns (= heads x head_dim) each program reads
(:func:`fastgpt.kernels.attention_decode.combined_attention_tile`: the valid splits, chunk start
<= ``cache_pos`` read on the device, log-sum-exp weighted, rounded to the dtype as a stored output
would be). Both kernels take it, with split-K too. One launch per layer fewer.

Programmatic dependent launch (:func:`fastgpt.kernels.utils.pdl_enabled`)
------------------------------------------------------------------------
On sm_90 both kernels launch with ``launch_pdl=True``; in the kernel the first weight tile (the
whole weight tile in the whole-row kernel) and the bias are loaded BEFORE ``gdc_wait()``, so the
weight stream overlaps the previous kernel's tail and the launch gap; ``x``, the residual, the
partials and every write come after it, then ``gdc_launch_dependents()``. ``USE_PDL`` is False
under the interpreter (``gdc_*`` cannot be traced there) and with ``FASTGPT_PDL=0``.

The choice between these GEMVs and :func:`cublas_linear` per shape is :mod:`fastgpt.kernels.linear_plan`.

CUDA graphs: the split-K workspace of a (shape, config) is allocated on its first eager launch and
reused by every later launch and graph replay (launches on one stream are ordered, and each
finishing program leaves its counters at 0); a split-K launch whose workspace does not exist yet
raises during capture instead of allocating inside the graph's private pool.

Kernel count per transformer layer, decode (M = B <= 16), by construction
--------------------------------------------------------------------------
Before (PyTorch ops): ln_1, c_attn addmm, [attention], c_proj addmm, residual add, ln_2, c_fc addmm,
GELU, c_proj addmm, residual add = 9 launches + attention.
After (every GEMV plan "triton"): ln_1+c_attn+bias, attention (split partials, one launch),
c_proj+split combine+bias+residual, ln_2+c_fc+bias+GELU, c_proj+bias+residual = 5 launches (a
LLaMA layer the same 5: RMSNorm+qkv, attention, o_proj+combine+residual, RMSNorm+gate_up+SwiGLU,
down+residual; the rotary embedding rides in the attention kernels' ``rope=``); per step, ln_f +
LM head (persistent) is one more launch (and the first layer's ``wte + wpe`` one add). With a
"cublas" plan an op costs its cuBLAS call plus one LayerNorm / RMSNorm launch (norm ops; silu_glu
adds its two element-wise ops) or plus nothing (residual ops: the add is deferred into the next
norm, which becomes an add + norm launch); see ``fastgpt.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

import torch.nn.functional as F

from fastgpt.reference import GELU_APPROXIMATE, LINEAR_ACTIVATIONS, NORMS

from .attention_decode import AttentionPartials, _active_splits, combined_attention_tile
from .layernorm import add_layernorm, add_rmsnorm, as_rows, check_no_partial_overlap, check_rows_disjoint
from .utils import check_tensor, interpreting, note_launch, pdl_enabled, triton_usable_on

__all__ = [
    "GEMV_MAX_M",
    "ACTIVATIONS",
    "NORM_CODES",
    "GemvConfig",
    "M1_TILES",
    "DOT_TILES",
    "linear",
    "cublas_linear",
    "default_config",
    "row_config",
    "uses_row_kernel",
    "candidate_configs",
    "workspace_for",
    "m_bucket",
    "output_width",
]

#: The most rows (B*T) the GEMV kernel takes; larger M is a GEMM (prefill) and goes to cuBLAS.
GEMV_MAX_M = 16

#: Activation name -> the kernel's ACTIVATION code: the names of the one table,
#: :data:`fastgpt.reference.LINEAR_ACTIVATIONS`, in its order (1 gelu_tanh, 2 gelu, 3 silu_glu).
ACTIVATIONS = {None: 0, **{name: code for code, name in enumerate(LINEAR_ACTIVATIONS, start=1)}}
#: ``norm=`` name -> the kernels' NORM code (0: no norm, ``ln_weight`` None): the names of
#: :data:`fastgpt.reference.NORMS` in its order (1 layernorm, 2 rmsnorm).
NORM_CODES = {name: code for code, name in enumerate(NORMS, start=1)}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class GemvConfig:
    """One tile shape of the GEMV kernel.

    ``split_k`` is an upper bound: the launcher uses ``cdiv(K, k_per_split)`` splits with
    ``k_per_split`` a multiple of ``block_k``, so that no split is empty.
    """

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1

    def with_split(self, split_k: int) -> "GemvConfig":
        return GemvConfig(self.block_n, self.block_k, self.num_warps, self.num_stages, split_k)


#: ``(block_n, block_k, num_warps, num_stages)`` tiles for M == 1 (element-wise FMA + one reduction).
M1_TILES: tuple[tuple[int, int, int, int], ...] = ((16, 256, 4, 3), (32, 256, 8, 3), (8, 512, 4, 3), (16, 512, 8, 3))
#: Tiles for 2 <= M <= 16 (tl.dot with BLOCK_M = 16; block_n, block_k >= 16 for the MMA shape).
DOT_TILES: tuple[tuple[int, int, int, int], ...] = ((32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 3))
#: FASTGPT_LINEAR=auto measures the first AUTO_TILES tiles of the regime at the heuristic split
#: (each distinct config is a Triton compile, ~1 s, at first use); =tune measures every tile at
#: the heuristic split and twice it.
AUTO_TILES = 2

#: The whole-row kernel (M == 1, K <= ROW_K_MAX): BLOCK_N * next_power_of_2(K) ~ ROW_TILE_ELEMS
#: weights per tile (two tiles in flight per program: ~64 registers a thread at 4 warps).
ROW_K_MAX = 2048
ROW_TILE_ELEMS = 4096
#: Above PERSISTENT_MIN_TILES_PER_SM column tiles per SM (the LM head: 12,565 tiles of 4 rows for
#: GPT-2), the whole-row kernel runs persistent with PERSISTENT_PROGRAMS_PER_SM programs per SM,
#: each streaming every G-th tile and normalising its row once.
PERSISTENT_MIN_TILES_PER_SM = 8
PERSISTENT_PROGRAMS_PER_SM = 4

#: Split-K aims for about this many programs per SM, with at most MAX_SPLIT_K splits.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 32


def _block_m(M: int) -> int:
    return 1 if M == 1 else 16



@triton.jit
def _row_statistics(x_rows, mask_m, K, ln_eps, NORM: tl.constexpr, LN_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(mean, rstd)`` of the ``BLOCK_M`` rows over the whole of K, float32 ``(BM,)`` each.

    NORM 1 (LayerNorm): exact two-pass mean and biased variance. NORM 2 (RMSNorm): one pass,
    ``rstd = 1 / sqrt(mean(x^2) + eps)`` and ``mean`` is 0 (unused). ``LN_ROW > 0``: the rows in one
    ``(BM, LN_ROW)`` load (M == 1, K <= LN_ROW_MAX); else BLOCK_K chunks whose sums accumulate
    lane-wise and are reduced across threads once per pass (the re-reads hit L1).
    """
    if LN_ROW > 0:
        offs_r = tl.arange(0, LN_ROW)
        mask_r = offs_r < K
        xr = tl.load(x_rows + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        xr = xr.to(tl.float32)  # (BM, LN_ROW)
        if NORM == 1:
            mean = tl.sum(xr, axis=1) / K  # (BM,)
            d = tl.where(mask_r[None, :], xr - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + ln_eps)  # (BM,)
        else:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=1) / K + ln_eps)  # masked lanes are 0
    else:
        offs_kb = tl.arange(0, BLOCK_K)
        if NORM == 1:
            total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_kb
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
                total += xt.to(tl.float32)
            mean = tl.sum(total, axis=1) / K  # (BM,)
            sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):  # these re-reads hit L1
                offs_k = k0 + offs_kb
                mask_k = offs_k < K
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                d = tl.where(mask_k[None, :], xt.to(tl.float32) - mean[:, None], 0.0)
                sq += d * d
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + ln_eps)  # (BM,)
        else:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_kb
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
                xt = xt.to(tl.float32)
                sq += xt * xt
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + ln_eps)  # (BM,)
    return mean, rstd


@triton.jit
def _normalise(xt, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, mask_k, NORM: tl.constexpr):
    """A ``(BM, BK)`` chunk of x normalised, rounded to x's dtype as a stored norm output would be.

    NORM 1: ``(x - mean) * rstd * g + b``. NORM 2, Hugging Face's ``LlamaRMSNorm``: ``x * rstd``
    rounded to the dtype, then times ``g`` (and rounded again: the product of two dtype tensors).
    Masked K lanes get ``g = b = 0`` and stay 0.
    """
    g = tl.load(ln_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if NORM == 1:
        b = tl.load(ln_b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xn = (xt.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
    else:
        xn = (xt.to(tl.float32) * rstd[:, None]).to(xt.dtype).to(tl.float32) * g[None, :]
    return xn.to(xt.dtype)


@triton.jit(do_not_specialize=["count_slot", "attn_heads", "attn_max_len", "attn_chunk", "attn_n_split"])
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    ln_w_ptr,
    ln_b_ptr,
    part_ptr,
    count_ptr,
    count_slot,
    attn_o_ptr,
    attn_m_ptr,
    attn_l_ptr,
    attn_pos_ptr,
    attn_heads,
    attn_max_len,
    attn_chunk,
    attn_n_split,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    n_split,
    k_per_split,
    ln_eps,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 gelu_tanh, 2 gelu (erf), 3 silu_glu (output N/2 columns)
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,  # 0 none, 1 LayerNorm, 2 RMSNorm (the prologue on x)
    LN_ROW: tl.constexpr,  # > 0: norm statistics from one (BLOCK_M, LN_ROW) load of the rows
    USE_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter + bfloat16 only, see _dot_flags
    ATTN_HEAD_DIM: tl.constexpr,  # > 0: x is the attention output, combined here from its partials
    USE_PDL: tl.constexpr,  # programmatic dependent launch: weights before gdc_wait, the rest after
):
    # silu_glu: the BLOCK_N weight rows of a tile are BLOCK_N/2 (gate, up) pairs -> BLOCK_N/2 outputs.
    OUT_N: tl.constexpr = BLOCK_N // 2 if ACTIVATION == 3 else BLOCK_N
    n_out = N // 2 if ACTIVATION == 3 else N
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # (BM,)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    offs_o = pid_n * OUT_N + tl.arange(0, OUT_N)  # (ON,): the output columns (= offs_n without GLU)
    mask_mo = mask_m[:, None] & (offs_o < n_out)[None, :]
    offs_kb = tl.arange(0, BLOCK_K)  # (BK,)
    # Row base pointers; int64 so that row * stride never wraps (the LM head is 50257 x 1600).
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BN, 1)
    offs_m64 = offs_m.to(tl.int64)
    if USE_SPLIT:
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    else:
        k_lo = 0
        k_hi = K

    # Latency, not bandwidth, bounds a program here (1-4 K chunks each): issue the first weight
    # tile and the epilogue's operands before anything waits on memory.
    if BLOCK_M == 1:
        offs_k = k_lo + offs_kb
        w_next = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < k_hi)[None, :], other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
    if USE_PDL:
        # Above: constant data only (the weight, the bias), issued while the previous kernel may
        # still run. Below: its outputs (x, the residual, the attention partials) and our writes.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    res = 0.0
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m64[:, None] * stride_rm + offs_o[None, :], mask=mask_mo, other=0.0)
    if ATTN_HEAD_DIM > 0:
        n_active, pos_ok = _active_splits(tl.load(attn_pos_ptr), attn_max_len, attn_chunk, attn_n_split)

    if NORM > 0:
        # Row statistics over the whole of K (every split needs them).
        mean, rstd = _row_statistics(x_rows, mask_m, K, ln_eps, NORM, LN_ROW, BLOCK_M, BLOCK_K)

    if BLOCK_M == 1:
        # acc2 takes w * x element-wise; one cross-thread reduction after the loop. The next
        # weight tile is loaded before the current one is used (two tiles in flight).
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w = w_next
            offs_nx = k0 + BLOCK_K + offs_kb
            w_next = tl.load(w_rows + offs_nx[None, :], mask=mask_n[:, None] & (offs_nx < k_hi)[None, :], other=0.0)
            offs_k = k0 + offs_kb
            mask_k = offs_k < k_hi
            if ATTN_HEAD_DIM > 0:
                xt = combined_attention_tile(
                    attn_o_ptr, attn_m_ptr, attn_l_ptr, offs_m, mask_m, offs_k, mask_k,
                    attn_heads, attn_n_split, n_active, pos_ok, ATTN_HEAD_DIM,
                ).to(w_ptr.dtype.element_ty)  # (1, BK), rounded as a stored attention output
            else:
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (1, BK)
            if NORM > 0:
                xt = _normalise(xt, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, mask_k, NORM)
            acc2 += w.to(tl.float32) * xt.to(tl.float32)  # (BN, BK) * (1, BK)
        acc = tl.sum(acc2, axis=1)[None, :]  # (1, BN)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):  # tl.dot loads are software-pipelined (num_stages)
            offs_k = k0 + offs_kb
            mask_k = offs_k < k_hi
            if ATTN_HEAD_DIM > 0:
                xt = combined_attention_tile(
                    attn_o_ptr, attn_m_ptr, attn_l_ptr, offs_m, mask_m, offs_k, mask_k,
                    attn_heads, attn_n_split, n_active, pos_ok, ATTN_HEAD_DIM,
                ).to(w_ptr.dtype.element_ty)  # (BM, BK)
            else:
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            if NORM > 0:
                xt = _normalise(xt, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, mask_k, NORM)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # (BN, BK)
            if UPCAST_DOT:
                acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PRECISION)  # (BM, BK) @ (BK, BN)

    if USE_SPLIT:
        # Partials: (n_split, M, N) float32; index (s*M + m)*N + n fits int32 (checked on the host).
        tl.store(part_ptr + (pid_k * M + offs_m)[:, None] * N + offs_n[None, :], acc, mask=mask_mn)
        # Every thread's partial stores happen before the one releasing atomic (CTA barrier).
        tl.debug_barrier()
        # Counters: (2, n_tiles); this launch counts in row count_slot (launches alternate rows).
        n_tiles = tl.num_programs(0)
        arrived = tl.atomic_add(count_ptr + count_slot * n_tiles + pid_n, 1, sem="acq_rel", scope="gpu")
        last = arrived == n_split - 1
        mask_last = mask_mn & last
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Fixed split order (the same sum whichever split finishes), 8 loads in flight at a time.
        for s0 in range(0, n_split, 8):
            for j in tl.static_range(8):
                p = part_ptr + ((s0 + j) * M + offs_m)[:, None] * N + offs_n[None, :]
                acc += tl.load(p, mask=mask_last & (s0 + j < n_split), other=0.0, cache_modifier=".cg")
        # Clear both rows for the next launches: a launch that never completed (some programs never
        # arrived) or two launches racing on the same counters left a stale count only in their
        # own row, which the next launch does not use and whose finisher clears here.
        tl.store(count_ptr + count_slot * n_tiles + pid_n, 0, mask=last)
        tl.store(count_ptr + (1 - count_slot) * n_tiles + pid_n, 0, mask=last)
        mask_out = mask_mo & last
    else:
        mask_out = mask_mo

    _store_epilogue(acc, bias, res, out_ptr, offs_m64, offs_o, stride_om, mask_out, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)


@triton.jit
def _store_epilogue(acc, bias, res, out_ptr, offs_m64, offs_o, stride_om, mask_out, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """``out = residual + act(acc + bias)`` for a (BM, BN) float32 tile, rounded once and stored.

    ``offs_o`` are the output columns: BN of them, or BN/2 with silu_glu, whose (gate, up) column
    pairs (adjacent: the weight rows are interleaved) become one ``silu(gate) * up`` each.
    """
    if HAS_BIAS:
        acc += bias[None, :]
    if ACTIVATION == 1:
        # 0.5 y (1 + tanh(u)) == y * sigmoid(2u): exp overflow to inf gives y / inf = 0, not NaN.
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 3:
        # (BM, BN) -> (BM, BN/2, 2) -> gate (BM, BN/2), up (BM, BN/2); silu(g) = g * sigmoid(g),
        # written g / (1 + exp(-g)): a very negative gate gives g / inf = -0, not NaN.
        gate, up = tl.split(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 2, 2)))
        acc = gate / (1.0 + tl.exp(-gate)) * up
    if HAS_RESIDUAL:
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m64[:, None] * stride_om + offs_o[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit(do_not_specialize=["attn_heads", "attn_max_len", "attn_chunk", "attn_n_split"])
def _gemv_row_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    ln_w_ptr,
    ln_b_ptr,
    attn_o_ptr,
    attn_m_ptr,
    attn_l_ptr,
    attn_pos_ptr,
    attn_heads,
    attn_max_len,
    attn_chunk,
    attn_n_split,
    N,
    K,
    stride_wn,
    ln_eps,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_K: tl.constexpr,  # next_power_of_2(K): the whole row is one chunk
    ATTN_HEAD_DIM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row (M == 1), the whole of K in one chunk: no K loop, no split-K, no workspace.

    Program ``p`` of ``G`` owns column tiles ``p, p + G, p + 2G, ...`` (``G`` = the grid; with
    ``G`` = the tile count each program owns one tile; the LM head runs persistent, ``G`` ~ a few
    programs per SM). The normalised row (LayerNorm or RMSNorm statistics, or the attention
    combine) is computed once per program and stays in registers; every tile is one
    ``(BLOCK_N, ROW_K)`` weight load, the next tile's issued before the current one is reduced.
    """
    OUT_N: tl.constexpr = BLOCK_N // 2 if ACTIVATION == 3 else BLOCK_N
    n_out = N // 2 if ACTIVATION == 3 else N
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offs_k = tl.arange(0, ROW_K)
    mask_k = offs_k < K
    offs_m = tl.arange(0, 1)  # (1,): the one row
    mask_m = offs_m < 1
    offs_tile = tl.arange(0, BLOCK_N)
    offs_otile = tl.arange(0, OUT_N)
    # The first tile's weight: constant data, in flight before the previous kernel has finished.
    offs_n = pid * BLOCK_N + offs_tile
    mask_n = offs_n < N
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    if ATTN_HEAD_DIM > 0:
        n_active, pos_ok = _active_splits(tl.load(attn_pos_ptr), attn_max_len, attn_chunk, attn_n_split)
        xr = combined_attention_tile(
            attn_o_ptr, attn_m_ptr, attn_l_ptr, offs_m, mask_m, offs_k, mask_k,
            attn_heads, attn_n_split, n_active, pos_ok, ATTN_HEAD_DIM,
        )  # (1, ROW_K) float32
        xr = xr.to(w_ptr.dtype.element_ty).to(tl.float32)  # rounded as a stored attention output
    else:
        xr = tl.load(x_ptr + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)  # (1, ROW_K)
    # Norm statistics once per program, not once per tile (exact, as the reference).
    if NORM == 1:
        mean = tl.sum(xr, axis=1) / K  # (1,)
        d = tl.where(mask_k[None, :], xr - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + ln_eps)
        g = tl.load(ln_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        b = tl.load(ln_b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        # Masked K lanes get g = b = 0 and stay 0; rounded like a stored LayerNorm output.
        xr = (d * rstd[:, None] * g[None, :] + b[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)
    elif NORM == 2:
        rstd = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=1) / K + ln_eps)  # (1,); masked lanes are 0
        g = tl.load(ln_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        # HF LlamaRMSNorm: x * rstd rounded to the dtype, times g, rounded again.
        xn = (xr * rstd[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32) * g[None, :]
        xr = xn.to(w_ptr.dtype.element_ty).to(tl.float32)

    for tile in range(pid, tl.cdiv(N, BLOCK_N), n_programs):
        offs_n = tile * BLOCK_N + offs_tile
        mask_n = offs_n < N
        offs_o = tile * OUT_N + offs_otile
        mask_o = offs_o < n_out
        # Prefetch the next tile of this program (nothing past the last: masked).
        offs_nx = offs_n + n_programs * BLOCK_N
        mask_nx = offs_nx < N
        w_next = tl.load(
            w_ptr + offs_nx.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], mask=mask_nx[:, None] & mask_k[None, :], other=0.0
        )
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = 0.0
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + offs_o[None, :], mask=mask_o[None, :], other=0.0)
        acc = tl.sum(w.to(tl.float32) * xr, axis=1)[None, :]  # (1, BN)
        _store_epilogue(acc, bias, res, out_ptr, offs_m.to(tl.int64), offs_o, 0, mask_o[None, :], HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
        w = w_next


# --------------------------------------------------------------------------------------------
# Configs and the split-K workspace
# --------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: few programs (each costs ~0.1 s there); tests pick split-K explicitly


def _split_for(N: int, K: int, block_n: int, block_k: int, n_sm: int) -> int:
    """Splits so that column tiles x splits reaches ~PROGRAMS_PER_SM programs per SM."""
    n_tiles = triton.cdiv(N, block_n)
    k_chunks = triton.cdiv(K, block_k)
    want = triton.cdiv(PROGRAMS_PER_SM * n_sm, n_tiles)
    return max(1, min(k_chunks, want, MAX_SPLIT_K))


def _effective_split(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(n_split, k_per_split): at most ``split_k`` non-empty splits of whole BLOCK_K chunks."""
    k_chunks = triton.cdiv(K, block_k)
    per = triton.cdiv(k_chunks, max(1, min(split_k, k_chunks)))
    return triton.cdiv(k_chunks, per), per * block_k


def row_config(K: int) -> GemvConfig:
    """The whole-row config for M == 1 and ``K <= ROW_K_MAX``: ``block_k = next_power_of_2(K)``
    (one K chunk: no loop, no split-K, no workspace), ``block_n`` rows per tile."""
    row_k = triton.next_power_of_2(K)
    return GemvConfig(max(1, min(16, ROW_TILE_ELEMS // row_k)), row_k, 4, 1, 1)


def uses_row_kernel(M: int, K: int, config: GemvConfig) -> bool:
    """Whether a launch of ``config`` runs the whole-row kernel (else the K-loop / split-K kernel)."""
    return M == 1 and K <= ROW_K_MAX and config.block_k >= K and config.split_k == 1


def row_grid(N: int, config: GemvConfig, device: torch.device | str) -> tuple[int, int]:
    """(programs, column tiles) of a whole-row launch: one program per tile, or persistent."""
    n_tiles = triton.cdiv(N, config.block_n)
    n_sm = _num_sms(torch.device(device))
    if n_tiles > PERSISTENT_MIN_TILES_PER_SM * n_sm:
        return PERSISTENT_PROGRAMS_PER_SM * n_sm, n_tiles
    return n_tiles, n_tiles


def default_config(M: int, N: int, K: int, device: torch.device | str) -> GemvConfig:
    """The config used without a measurement (the interpreter, ``FASTGPT_LINEAR=triton``):
    the whole-row config for M == 1 and ``K <= ROW_K_MAX``, else the first tile of the regime."""
    if M == 1 and K <= ROW_K_MAX:
        return row_config(K)
    tiles = M1_TILES if M == 1 else DOT_TILES
    bn, bk, warps, stages = tiles[0]
    return GemvConfig(bn, bk, warps, stages, _split_for(N, K, bn, bk, _num_sms(torch.device(device))))


def candidate_configs(M: int, N: int, K: int, device: torch.device | str, *, exhaustive: bool = False) -> list[GemvConfig]:
    """The configs the measurement tries for this shape, deduplicated: the first AUTO_TILES tiles
    of the M regime at the heuristic split or, ``exhaustive``, every tile at the heuristic split
    and at twice it (``FASTGPT_LINEAR=tune``)."""
    n_sm = _num_sms(torch.device(device))
    tiles = M1_TILES if M == 1 else DOT_TILES
    out: list[GemvConfig] = [row_config(K)] if M == 1 and K <= ROW_K_MAX else []
    for bn, bk, warps, stages in tiles if exhaustive else tiles[:AUTO_TILES]:
        s = _split_for(N, K, bn, bk, n_sm)
        for split in (s, 2 * s) if exhaustive else (s,):
            n_split, _ = _effective_split(K, bk, split)
            cfg = GemvConfig(bn, bk, warps, stages, n_split)
            if cfg not in out:
                out.append(cfg)
    return out


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace_for(M: int, N: int, config: GemvConfig, K: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace a launch of ``config`` on an (M, N, K) problem uses.

    ``(partials, counters)``: float32 ``(n_split, m_bucket(M), N)`` and int32 ``(2, n_tiles)`` zeros,
    allocated on first use and kept (and reused) for the life of the process, one per
    (device, N, tile, split, M bucket). Raises RuntimeError when it would have to be allocated
    during CUDA-graph capture.
    """
    device = torch.device(device)
    n_split, _ = _effective_split(K, config.block_k, config.split_k)
    rows = m_bucket(M)
    n_tiles = triton.cdiv(N, config.block_n)
    key = (device, N, config.block_n, n_split, rows)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "kernels.linear: the split-K workspace for this shape does not exist yet and cannot be "
                "allocated during CUDA-graph capture; run the same call once eagerly before capturing"
            )
        ws = (
            torch.empty((n_split, rows, N), dtype=torch.float32, device=device),
            torch.zeros((2, n_tiles), dtype=torch.int32, device=device),
        )
        _WORKSPACES[key] = ws
    return ws


_COUNT_SLOTS: dict[int, int] = {}  # counters' data_ptr -> the row the next launch counts in


def _next_count_slot(counters: torch.Tensor) -> int:
    """0, 1, 0, ... per workspace: the counter row of this launch (see the module docstring)."""
    slot = _COUNT_SLOTS.get(counters.data_ptr(), 0)
    _COUNT_SLOTS[counters.data_ptr()] = 1 - slot
    return slot


def m_bucket(M: int) -> int:
    """1, 2, 4, 8, 16 for M <= 16 (the next power of two); M itself beyond."""
    return 1 << (M - 1).bit_length() if M <= GEMV_MAX_M else M


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------
def output_width(N: int, activation: str | None) -> int:
    """The output's columns for a weight of ``N`` rows: ``N / 2`` with ``"silu_glu"`` (one output
    per (gate, up) row pair), else ``N``."""
    return N // 2 if activation == "silu_glu" else N


def _check_linear_args(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, norm="layernorm"):
    """Shared validation of the Triton launcher and the cuBLAS path; returns (x_rows, N, K).

    ``N`` is the weight's rows; the output (and the residual) has :func:`output_width` columns.
    """
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension (K), got shape {tuple(x.shape)}")
    dtype, device, K = x.dtype, x.device, x.shape[-1]
    check_tensor(weight, "weight", ndim=2, dtypes=(dtype,), device=device)
    if weight.shape[1] != K:
        raise ValueError(f"weight must be (N, K={K}) in nn.Linear layout, got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one output row (N >= 1)")
    if weight.stride(1) != 1 and K > 1:
        raise ValueError(f"weight must be contiguous along K (its last dimension), got strides {weight.stride()}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=(dtype,), device=device)
        if bias.shape[0] != N or (N > 1 and bias.stride(0) != 1):
            raise ValueError(f"bias must be a contiguous ({N},) tensor, got shape {tuple(bias.shape)} strides {bias.stride()}")
    if activation not in ACTIVATIONS:
        allowed = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")
    if activation == "silu_glu" and N % 2:
        raise ValueError(
            f"activation='silu_glu' needs an even N (weight rows interleaved as (gate, up) pairs), got N={N}"
        )
    if residual is not None:
        check_tensor(residual, "residual", dtypes=(dtype,), device=device, last_dim_contiguous=True)
        expected = (*x.shape[:-1], output_width(N, activation))
        if tuple(residual.shape) != expected:
            what = "x's rows, N/2 with silu_glu" if activation == "silu_glu" else "x's rows, N"
            raise ValueError(f"residual must have shape {expected} ({what}), got {tuple(residual.shape)}")
    if norm == "rmsnorm":
        if ln_bias is not None:
            raise ValueError("norm='rmsnorm' takes no ln_bias (RMSNorm has a weight only); pass ln_bias=None")
    elif (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together (or neither)")
    if ln_weight is not None:
        for t, name in ((ln_weight, "ln_weight"), (ln_bias, "ln_bias")):
            if t is None:  # RMSNorm's absent bias
                continue
            check_tensor(t, name, ndim=1, dtypes=(dtype,), device=device)
            if t.shape[0] != K or (K > 1 and t.stride(0) != 1):
                raise ValueError(f"{name} must be a contiguous ({K},) tensor, got shape {tuple(t.shape)} strides {t.stride()}")
        if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not 0 < ln_eps < float("inf"):
            raise ValueError(f"ln_eps must be a finite number > 0, got {ln_eps!r}")
    return as_rows(x, "x"), N, K


def _check_attn_partials(partials, x, weight, ln_weight) -> torch.Tensor:
    """Validate ``attn_partials`` (with ``x`` None); returns the (B, 1, H*D) stand-in for x's shape."""
    if not isinstance(partials, AttentionPartials):
        raise TypeError(f"attn_partials must be the AttentionPartials of decode_attention(combine=False), got {type(partials).__name__}")
    if x is not None:
        raise ValueError("pass x or attn_partials, not both: with attn_partials, x is the combined attention output")
    if ln_weight is not None:
        raise ValueError("attn_partials takes no LayerNorm (ln_weight must be None)")
    rows = partials.rows
    check_tensor(weight, "weight", ndim=2)
    for name, t in (("attn_partials.o", partials.o), ("attn_partials.m", partials.m), ("attn_partials.l", partials.l)):
        check_tensor(t, name, dtypes=(torch.float32,), device=rows.device)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    B, H, S, D = partials.o.shape
    if tuple(partials.m.shape) != (B, H, S) or tuple(partials.l.shape) != (B, H, S):
        raise ValueError(f"attn_partials.m and .l must be ({B}, {H}, {S}), got {tuple(partials.m.shape)}, {tuple(partials.l.shape)}")
    if tuple(rows.shape) != (B, 1, H * D):
        raise ValueError(f"attn_partials.rows must be ({B}, 1, {H * D}), got {tuple(rows.shape)}")
    check_tensor(partials.cache_pos, "attn_partials.cache_pos", ndim=1, dtypes=(torch.int32,), device=rows.device)
    if not 1 <= partials.chunk or partials.chunk * S < partials.max_len:
        raise ValueError(f"attn_partials: {S} chunks of {partials.chunk} slots must cover max_len={partials.max_len}")
    if B * H * S * D > _INT32_MAX // 2:
        raise ValueError(f"attn_partials.o has {B * H * S * D} elements; at most {_INT32_MAX // 2} are supported")
    return rows


def _check_out(out, x, N_out, dtype, device, residual, weight):
    expected = (*x.shape[:-1], N_out)
    if out is None:
        return torch.empty(expected, dtype=dtype, device=device)
    check_tensor(out, "out", dtypes=(dtype,), device=device, last_dim_contiguous=True)
    if tuple(out.shape) != expected:
        raise ValueError(f"out must have shape {expected}, got {tuple(out.shape)}")
    # Other programs still read x and W while one writes out; only the residual, read and written
    # element by element by the same program, may be the same tensor (in place).
    check_rows_disjoint(as_rows(out, "out"), "out")
    check_no_partial_overlap(out, "out", x, "x", may_alias=False)
    check_no_partial_overlap(out, "out", weight, "weight", may_alias=False)
    if residual is not None:
        check_no_partial_overlap(out, "out", residual, "residual", may_alias=True)
    return out


def _check_config(config: GemvConfig, M: int, activation: str | None = None) -> None:
    if not isinstance(config, GemvConfig):
        raise TypeError(f"config must be a GemvConfig, got {type(config).__name__}")
    for name in ("block_n", "block_k"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1) or v > 4096:
            raise ValueError(f"config.{name} must be a power of two in [1, 4096], got {v!r}")
    if M > 1 and (config.block_n < 16 or config.block_k < 16):
        raise ValueError(f"M={M} > 1 uses tl.dot: config.block_n and config.block_k must be >= 16, got {config}")
    if activation == "silu_glu" and config.block_n < 2:
        raise ValueError(f"activation='silu_glu' needs config.block_n >= 2 (whole (gate, up) pairs per tile), got {config}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"config.num_warps must be one of 1, 2, 4, 8, 16, got {config.num_warps!r}")
    if not isinstance(config.num_stages, int) or not 1 <= config.num_stages <= 8:
        raise ValueError(f"config.num_stages must be in [1, 8], got {config.num_stages!r}")
    if not isinstance(config.split_k, int) or not 1 <= config.split_k <= 1024:
        raise ValueError(f"config.split_k must be in [1, 1024], got {config.split_k!r}")


#: The widest row whose LayerNorm statistics come from a single load (M == 1).
LN_ROW_MAX = 4096


def _ln_row(has_ln: bool, M: int, K: int) -> int:
    """LN_ROW: ``next_power_of_2(K)`` for M == 1 rows up to LN_ROW_MAX, else 0 (chunked passes);
    the same for LayerNorm and RMSNorm statistics."""
    width = triton.next_power_of_2(K)
    return width if has_ln and M == 1 and width <= LN_ROW_MAX else 0


def _dot_flags(dtype: torch.dtype) -> tuple[str, bool]:
    """``(DOT_PRECISION, UPCAST_DOT)``: float32 dots are exact FMA (``"ieee"``, no TF32); the Triton
    3.6 interpreter multiplies bfloat16 bit patterns as integers in ``tl.dot``, so there (only) the
    bf16 operands are widened to float32 first: the same exact products the tensor cores form."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (interpreting() and dtype == torch.bfloat16)


def linear(
    x: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    norm: str = "layernorm",
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    attn_partials: AttentionPartials | None = None,
) -> torch.Tensor:
    """``residual + act(norm(x) @ weight.T + bias)`` for ``M <= GEMV_MAX_M`` rows, one Triton launch.

    Parameters
    ----------
    x : (..., K) float16 / bfloat16 / float32, ``M = prod(leading dims)`` in ``[1, 16]``; its rows
        may be strided (e.g. ``h[:, -1]``) but must be viewable as ``(M, K)``; last dim contiguous.
    weight : (N, K) in x's dtype, ``nn.Linear`` layout, contiguous along K. With ``"silu_glu"``
        N = 2F is even and the rows are interleaved: row ``2j`` is gate ``j``, row ``2j + 1`` up ``j``.
    bias : (N,) or None (interleaved like the weight's rows with ``"silu_glu"``).
    activation : None, ``"gelu_tanh"``, ``"gelu"`` or ``"silu_glu"`` (``silu(gate) * up``: the
        output has ``N_out = N / 2`` columns; ``N_out = N`` otherwise).
    residual : (..., N_out) with x's leading shape, or None; may be ``out`` itself (in place).
    ln_weight, ln_bias : (K,) -- normalise ``x`` first (eps ``ln_eps`` > 0): LayerNorm takes both,
        RMSNorm ``ln_weight`` only (``ln_bias`` None).
    norm : ``"layernorm"`` (default) or ``"rmsnorm"`` (Hugging Face's ``LlamaRMSNorm``: float32
        ``x * rsqrt(mean(x^2) + eps)``, rounded to the dtype, times ``ln_weight``).
    out : (..., N_out) preallocated output, or None to allocate. Must not overlap x or weight.
    config : the tile config, or None for :func:`default_config`.
    attn_partials : the decode attention's partials (``decode_attention(..., combine=False)``),
        with ``x`` None: ``x`` is then the attention output ``(B, 1, H*D)``, combined from the
        splits in the prologue (each program for the K columns it reads; the splits whose chunk
        starts at or before ``cache_pos``, read on the device) and rounded to the weight's dtype,
        exactly what the combine kernel would have stored. No norm with it.

    Returns
    -------
    (..., N_out) tensor in x's dtype (``out`` when given).

    CUDA-graph capturable once the same call ran eagerly (compile, split-K workspace).
    """
    if attn_partials is not None:
        x = _check_attn_partials(attn_partials, x, weight, ln_weight)
    x_rows, N, K = _check_linear_args(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, norm)
    dtype, device = x.dtype, x.device
    if not triton_usable_on(device):
        raise ValueError(
            f"kernels.linear.linear runs a Triton kernel: x must be on a CUDA device, or on the CPU with "
            f"TRITON_INTERPRET=1 set before kernels are imported; got {device}"
        )
    M = x_rows.shape[0]
    if not 1 <= M <= GEMV_MAX_M:
        raise ValueError(
            f"x has M={M} rows (the product of its leading dims); the GEMV kernel takes 1 <= M <= {GEMV_MAX_M}. "
            "Use cublas_linear (or linear_plan.plan()) for larger M"
        )
    out = _check_out(out, x, output_width(N, activation), dtype, device, residual, weight)
    if config is None:
        config = default_config(M, N, K, device)
    _check_config(config, M, activation)
    out_rows = as_rows(out, "out")
    res_rows = as_rows(residual, "residual") if residual is not None else out_rows
    has_ln = ln_weight is not None
    norm_code = NORM_CODES[norm] if has_ln else 0
    if not has_ln:
        ln_weight = out_rows  # unused (NORM=0)
    if ln_bias is None:
        ln_bias = out_rows  # unused (NORM 0 or 2)
    if attn_partials is not None:
        ap = attn_partials
        attn_args = (ap.o, ap.m, ap.l, ap.cache_pos, ap.n_head, ap.max_len, ap.chunk, ap.n_split)
    else:
        attn_args = (out_rows, out_rows, out_rows, out_rows, 0, 0, 0, 0)  # unused (ATTN_HEAD_DIM=0)
    attn_head_dim = attn_partials.head_dim if attn_partials is not None else 0
    use_pdl = pdl_enabled(device)

    if uses_row_kernel(M, K, config):
        n_programs, n_tiles = row_grid(N, config, device)
        _gemv_row_kernel[(n_programs,)](
            x_rows, weight, bias if bias is not None else out_rows, res_rows, out_rows,
            ln_weight, ln_bias, *attn_args, N, K, weight.stride(0), float(ln_eps),
            HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_RESIDUAL=residual is not None,
            NORM=norm_code, BLOCK_N=config.block_n, ROW_K=triton.next_power_of_2(K),
            ATTN_HEAD_DIM=attn_head_dim, USE_PDL=use_pdl, launch_pdl=use_pdl,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        note_launch(
            "linear", "triton", kernel="row", config=config, n_split=1, persistent=n_programs < n_tiles,
            attn_combine=attn_partials is not None, pdl=use_pdl, norm=norm if has_ln else None, activation=activation,
        )  # fmt: skip
        return out

    n_split, k_per_split = _effective_split(K, config.block_k, config.split_k)
    n_tiles = triton.cdiv(N, config.block_n)
    if n_split > 1:
        if n_split * m_bucket(M) * N > _INT32_MAX:
            raise ValueError(f"split-K partials of {n_split} x {M} x {N} exceed int32 indexing; use a smaller config.split_k")
        partials, counters = workspace_for(M, N, config, K, device)
        count_slot = _next_count_slot(counters)
    else:
        partials = counters = out_rows  # unused (USE_SPLIT=False)
        count_slot = 0
    dot_precision, upcast_dot = _dot_flags(dtype)

    _gemv_kernel[(n_tiles, n_split)](
        x_rows, weight, bias if bias is not None else out_rows, res_rows, out_rows,
        ln_weight, ln_bias, partials, counters, count_slot, *attn_args,
        M, N, K, x_rows.stride(0), weight.stride(0), res_rows.stride(0), out_rows.stride(0),
        n_split, k_per_split, float(ln_eps),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_RESIDUAL=residual is not None,
        NORM=norm_code, LN_ROW=_ln_row(has_ln, M, K), USE_SPLIT=n_split > 1,
        BLOCK_M=_block_m(M), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot,
        ATTN_HEAD_DIM=attn_head_dim, USE_PDL=use_pdl, launch_pdl=use_pdl,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    note_launch(
        "linear", "triton", kernel="k_loop", config=config, n_split=n_split, attn_combine=attn_partials is not None, pdl=use_pdl,
        norm=norm if has_ln else None, activation=activation,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# The cuBLAS side of the choice
# --------------------------------------------------------------------------------------------
def cublas_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    norm: str = "layernorm",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same op as :func:`linear` for any M, as cuBLAS plus small kernels.

    The norm: one :func:`kernels.layernorm.add_layernorm` / :func:`~kernels.layernorm.add_rmsnorm`
    launch (Triton); the product with its bias: ``torch.addmm`` / ``torch.mm`` (cuBLAS on the GPU)
    into ``out``; then the GELU and the residual add in place on ``out``. ``"silu_glu"``: the
    product goes to a ``(M, N)`` temporary and ``silu(gate) * up``
    (:func:`fastgpt.reference.activate`'s two ops) is written into ``out``. Used for prefill
    (M > 16) and where the measurement finds cuBLAS faster.
    """
    x_rows, N, K = _check_linear_args(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, norm)
    out = _check_out(out, x, output_width(N, activation), x.dtype, x.device, residual, weight)
    if residual is not None and residual.data_ptr() == out.data_ptr():
        raise ValueError("cublas_linear writes out before it adds the residual: out must not be the residual")
    if ln_weight is not None:
        if norm == "rmsnorm":
            x_rows = as_rows(add_rmsnorm(x_rows, ln_weight, ln_eps)[0], "x")
        else:
            x_rows = as_rows(add_layernorm(x_rows, ln_weight, ln_bias, ln_eps)[0], "x")
    out_rows = as_rows(out, "out")
    glu = activation == "silu_glu"
    y = torch.empty((x_rows.shape[0], N), dtype=x.dtype, device=x.device) if glu else out_rows
    if bias is not None:
        torch.addmm(bias, x_rows, weight.t(), out=y)
    else:
        torch.mm(x_rows, weight.t(), out=y)
    if glu:
        pairs = y.unflatten(-1, (N // 2, 2))  # (M, N) -> (M, N/2, 2): (gate, up) per output column
        torch.mul(F.silu(pairs[..., 0]), pairs[..., 1], out=out_rows)  # = reference.activate
    elif activation is not None:
        torch.ops.aten.gelu_(out_rows, approximate=GELU_APPROXIMATE[activation])
    if residual is not None:
        out_rows.add_(as_rows(residual, "residual"))
    note_launch("linear", "cublas", layernorm=ln_weight is not None, norm=norm if ln_weight is not None else None)
    return out
