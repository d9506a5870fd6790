"""Tests of the Triton flash-decoding attention (kernels/attention_decode.py) against fastgpt.reference.attention.

The oracle runs in float64 on copies of the inputs. Every launch writes into outputs, caches and
split workspaces poisoned with NaN, so an element a kernel forgets to write fails the test, and a
spy on the kernels' ``run`` proves the Triton path ran. Without a GPU the kernels run in the
Triton interpreter on a small subset (several decode splits, left padding, every autotune config
at a tiny size); the full shape matrix, CUDA graphs and the autotuned path on a GPU are marked
``cuda``. Prefill then decode steps (the model's order) are tested here too. Tolerances:
tests/attention_helpers.py.

Grouped-query attention (``H_kv < H``: SmolLM2 9/3, Qwen2.5 14/2, Llama-3 32/8, multi-query 4/1
and 48/1) and rotary embedding (plain, Llama-3-scaled and random frequencies) are checked the
same way: the output against ``reference.attention(..., rope=)``, the ROTATED key written at
``cache_pos`` against the reference's cache, ``combine=False`` partials (per query head) combined
in torch and by the out-projection's prologue, token-by-token decoding from an empty cache, the
kernel's own float32 sin/cos, and the sm_90 compile of both paths with rope on and off.
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
import triton
import triton.language as tl

from fastgpt import reference
from fastgpt.kv_cache import KVCache
from fastgpt.kernels import attention_common as AC
from fastgpt.kernels import attention_decode as AD
from fastgpt.kernels import attention_prefill as AP
from tests.attention_helpers import (
    ROPE_BAD,
    BF16, DEVICE, DTYPES, F16, F32, HAS_CUDA, assert_close, cuda_case, fused_qkv, kernel_signature, launches,
    make_row_start, nan_like, prefill_reference,
)
from tests.kernel_helpers import run_compile_workers, spill_bytes

# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
def fused_qkv_gqa(B: int, T: int, H: int, H_kv: int, D: int, dtype):
    """q (B, T, H, D), k, v (B, T, H_kv, D): strided views of one fused (B, T, (H + 2 H_kv) D)
    projection, as a grouped-query model makes them (``fused_qkv`` when ``H_kv == H``)."""
    if H_kv == H:
        return fused_qkv(B, T, H, D, dtype)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, device=DEVICE).to(dtype)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    return q.unflatten(-1, (H, D)), k.unflatten(-1, (H_kv, D)), v.unflatten(-1, (H_kv, D))


def rope_freqs(kind: str | None, D: int) -> torch.Tensor | None:
    """Rotary inverse frequencies (D/2,) float32: None, "plain" (base 10000), "llama3" (base 5e5
    with Llama 3.1's long-context rescaling: factor 8 below 1/4 of the 8192 original positions'
    frequency band edges, smooth in between) or "random" (positive, up to 1.5)."""
    if kind is None:
        return None
    if kind == "random":
        return (torch.rand(D // 2) * 1.5 + 0.01).to(DEVICE)
    base = 10000.0 if kind == "plain" else 500000.0
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    if kind == "llama3":
        factor, low, high, original = 8.0, 1.0, 4.0, 8192
        smooth = ((original * inv / (2 * torch.pi) - low) / (high - low)).clamp(0.0, 1.0)
        inv = inv * ((1.0 - smooth) / factor + smooth)  # short wavelengths kept, long ones / factor
    return inv.float().to(DEVICE)


def combine_in_torch(partials: AD.AttentionPartials, pos: int) -> torch.Tensor:
    """(B, 1, H, D) float64 output from the partials of the splits active at ``pos``: the sums of
    the combine kernel and of kernels.linear's prologue, per query head."""
    n_active = min(pos // partials.chunk + 1, partials.n_split)
    m, l, o = (t[:, :, :n_active].double() for t in (partials.m, partials.l, partials.o))
    w = torch.exp2(m - m.max(dim=2, keepdim=True).values)  # (B, H, n_active)
    l_tot = (w * l).sum(2)
    out = (w[..., None] * o).sum(2) / torch.where(l_tot > 0, l_tot, 1.0)[..., None]
    return out[:, None]


def run_decode_case(
    launches, dtype, B, H, D, S_max, pos, pad, n_split, config=None, *, n_kv_head=None, rope=None, combine=True
):
    """One decode step at slot ``pos`` over a random cache; checks output, cache and launches.

    ``n_kv_head``: K/V heads (default ``H``); ``rope``: a :func:`rope_freqs` kind; ``combine=False``:
    the partials, combined in torch (:func:`combine_in_torch`).
    """
    H_kv = n_kv_head or H
    inv_freq = rope_freqs(rope, D)
    row_start = make_row_start(B, pos + 1, pad)
    # Valid history in slots [0, pos); pad slots hold large finite garbage that must be masked;
    # slots >= pos are NaN (slot pos must come from registers, later slots must not be read).
    k_cache = torch.randn(B, H_kv, S_max, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(B, H_kv, S_max, D, device=DEVICE).to(dtype)
    slot = torch.arange(S_max, device=DEVICE)
    is_pad = slot[None, :] < row_start[:, None].long()  # (B, S_max)
    k_cache[is_pad[:, None, :, None].expand_as(k_cache)] = 50.0
    v_cache[is_pad[:, None, :, None].expand_as(v_cache)] = -50.0
    k_cache[:, :, pos:] = float("nan")
    v_cache[:, :, pos:] = float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q, k, v = fused_qkv_gqa(B, 1, H, H_kv, D, dtype)
    workspace = AD.decode_workspace(B, H, D, S_max, DEVICE, n_split=n_split, n_kv_head=n_kv_head)
    for t in workspace.values():
        t.fill_(float("nan"))
    out = torch.full((B, 1, H, D), float("nan"), dtype=dtype, device=DEVICE)
    cache_pos = torch.tensor([pos], dtype=torch.int32, device=DEVICE)

    if not combine:
        partials = AD.decode_attention(
            q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, combine=False, rope=inv_freq
        )
        assert partials.o.shape == (B, H, workspace["attn_o"].shape[2], D), "partials per query head"
        out = combine_in_torch(partials, pos).to(dtype)
        n_active = min(pos // partials.chunk + 1, partials.n_split)
        assert partials.m[:, :, n_active:].isnan().all(), "splits after cache_pos write nothing"
    elif config is None:
        result = AD.decode_attention(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out=out, rope=inv_freq)
        assert result is out
    else:
        AD._launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config=config, rope=inv_freq)

    n_split = workspace["attn_o"].shape[2]
    assert launches["_decode_split_kernel"] >= 1
    assert launches["_decode_combine_kernel"] == (1 if combine and n_split > 1 else 0)
    kr = k_before.double().nan_to_num(0.0)
    vr = v_before.double().nan_to_num(0.0)
    ref = reference.attention(q.double(), k.double(), v.double(), kr, vr, pos, row_start, rope=inv_freq)
    what = f"decode (H={H}, H_kv={H_kv}, n_split={n_split}, rope={rope})"
    assert_close(out, ref, dtype, what)
    # Slot pos now holds the new K/V (k rotated, as the reference writes it); every other slot is
    # bit-for-bit unchanged.
    if inv_freq is None:
        assert torch.equal(k_cache[:, :, pos], k[:, 0])
    else:
        assert_close(k_cache[:, :, pos], kr[:, :, pos], dtype, f"{what}: rotated k in the cache")
    assert torch.equal(v_cache[:, :, pos], v[:, 0])
    for cache, before in ((k_cache, k_before), (v_cache, v_before)):
        assert torch.equal(cache[:, :, :pos], before[:, :, :pos])
        assert cache[:, :, pos + 1 :].isnan().all()
    return out


# (B, H, D, S_max, pos, pad, n_split); n_split None = decode_num_splits (the production choice).
DECODE_CPU = [
    (1, 1, 64, 1, 0, False, None),  # first slot, single split
    (3, 3, 64, 40, 33, True, None),  # single split over 3 interpreter tiles; an all-pad row
    (2, 1, 128, 300, 299, True, None),  # default heuristic: 3 splits of 128
    (2, 1, 64, 100, 64, True, 7),  # 7 splits of 16; pos on a chunk boundary
    (1, 2, 64, 50, 20, False, 9),  # 9 splits of 16: splits 4..8 never become active
]
DECODE_CUDA = [
    (B, H, D, S_max, pos, B == 3, None)
    for B in (1, 3)
    for H in (1, 12, 25)
    for D in (64, 128)
    for S_max, pos in ((1, 0), (128, 127), (1000, 700), (8192, 8191))
] + [(256, 25, 64, 512, 500, True, None), (3, 12, 64, 5000, 4999, True, 1), (2, 4, 128, 777, 640, True, 13)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,H,D,S_max,pos,pad,n_split", [pytest.param(*c) for c in DECODE_CPU] + [cuda_case(*c) for c in DECODE_CUDA]
)
def test_decode_matches_reference_and_appends(launches, dtype, B, H, D, S_max, pos, pad, n_split):
    run_decode_case(launches, dtype, B, H, D, S_max, pos, pad, n_split)


def test_decode_pad_query_outputs_zeros(launches):
    # row_start beyond the current slot: the query is padding and attends to nothing.
    B, H, D, S = 2, 2, 64, 64
    q, k, v = fused_qkv(B, 1, H, D, F32)
    kc = torch.randn(B, H, S, D, device=DEVICE)
    vc = torch.randn(B, H, S, D, device=DEVICE)
    ws = AD.decode_workspace(B, H, D, S, DEVICE, n_split=4)
    out = AD.decode_attention(
        q, k, v, kc, vc, torch.tensor([30], dtype=torch.int32, device=DEVICE),
        torch.tensor([31, 0], dtype=torch.int32, device=DEVICE), ws,
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("pos", [-1, 64, 1000])
def test_decode_out_of_range_cache_pos_gives_nan_and_writes_nothing(launches, pos):
    B, H, D, S = 2, 2, 64, 64
    q, k, v = fused_qkv(B, 1, H, D, F32)
    kc = torch.randn(B, H, S, D, device=DEVICE)
    vc = torch.randn(B, H, S, D, device=DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    for n_split in (1, 4):
        ws = AD.decode_workspace(B, H, D, S, DEVICE, n_split=n_split)
        out = AD.decode_attention(
            q, k, v, kc, vc, torch.tensor([pos], dtype=torch.int32, device=DEVICE),
            torch.zeros(B, dtype=torch.int32, device=DEVICE), ws,
        )
        assert out.isnan().all(), f"n_split={n_split}"
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize(
    "dtype,B,H,D,T0,steps,max_len,n_split",
    [
        pytest.param(F16, 2, 2, 64, 13, 6, 40, 3),  # positions 13..18 cross the chunk boundary at 16
        pytest.param(F32, 3, 1, 128, 5, 3, 9, None),  # single split, cache filled to the last slot
        cuda_case(BF16, 3, 12, 64, 300, 40, 1024, None),
        cuda_case(F16, 4, 25, 64, 1000, 24, 1024, None),
        cuda_case(F32, 2, 12, 128, 129, 8, 200, 7),
    ],
)
def test_prefill_then_decode_steps_equal_full_causal_attention(launches, dtype, B, H, D, T0, steps, max_len, n_split):
    total = T0 + steps
    q, k, v = fused_qkv(B, total, H, D, dtype)
    row_start = make_row_start(B, T0 - 1, pad=True)  # every row keeps >= 1 real prompt token
    cache = KVCache(1, B, H, max_len, D, dtype, DEVICE)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.set_row_start(row_start)
    # As the model does it: the partials live in the cache's workspace dict, beside other scratch.
    cache.workspace.update(AD.decode_workspace(B, H, D, max_len, DEVICE, n_split=n_split), other=torch.zeros(1))
    kc, vc = cache.layer(0)

    outs = [AP.prefill_attention(q[:, :T0], k[:, :T0], v[:, :T0], kc, vc, cache.row_start)]
    cache.advance(T0)
    for t in range(T0, total):
        sl = slice(t, t + 1)
        outs.append(
            AD.decode_attention(q[:, sl], k[:, sl], v[:, sl], kc, vc, cache.pos_tensor, cache.row_start, cache.workspace)
        )
        cache.advance(1)

    assert launches["_prefill_kernel"] >= 1 and launches["_decode_split_kernel"] >= steps
    ref = prefill_reference(q, k, v, max_len, row_start)  # one causal pass over all tokens
    assert_close(outs[0], ref[:, :T0], dtype, "prefill")
    for i, out in enumerate(outs[1:]):
        assert_close(out, ref[:, T0 + i : T0 + i + 1], dtype, f"decode step {i}")
    assert torch.equal(kc[:, :, :total], k.transpose(1, 2))
    assert torch.equal(vc[:, :, :total], v.transpose(1, 2))
    assert kc[:, :, total:].isnan().all()


@pytest.mark.parametrize(
    "config", AD.DECODE_CONFIGS, ids=lambda c: "N{BLOCK_N}w{num_warps}".format(**c)
)
@pytest.mark.parametrize("n_split", [1, 3])
def test_decode_every_config(launches, config, n_split):
    run_decode_case(launches, F16, 2, 2, 64, 3 * config["BLOCK_N"] + 10, 3 * config["BLOCK_N"] + 1, True, n_split, config=config)


# --------------------------------------------------------------------------------------------
# Grouped-query heads and rotary embedding
# --------------------------------------------------------------------------------------------
# (dtype, B, H, H_kv, D, S_max, pos, pad, n_split, rope, combine): the LLaMA-family groupings at
# tiny cache sizes, one dtype each (the kernel code does not depend on the dtype but for the
# dot's precision flags, which the every-config test below crosses with the configs).
GQA_CPU = [
    (F32, 3, 9, 3, 64, 40, 33, True, 3, "plain", False),  # SmolLM2 (G 3), 3 splits; an all-pad row
    (F16, 2, 4, 1, 128, 24, 20, True, None, None, True),  # multi-query, one split, head_dim 128
    (BF16, 1, 8, 2, 64, 50, 47, False, 4, "llama3", True),  # Llama-3.2-1B (G 4), 4 splits
    (F32, 2, 14, 2, 128, 33, 32, True, 3, "random", False),  # Qwen2.5 (G 7): pos on a chunk boundary
    (F16, 1, 14, 2, 64, 20, 0, False, 2, "plain", True),  # the first slot (rope position 0)
    (BF16, 2, 2, 2, 64, 40, 35, True, 2, "random", False),  # G 1 (the per-head path) with rope
    (F16, 1, 40, 2, 64, 24, 17, False, 2, "llama3", False),  # G 20 > 16: two programs per K/V head
]
GQA_CUDA = [
    (dtype, B, H, H_kv, D, S_max, pos, B == 3, None, rope, combine)
    for B in (1, 3)
    for H, H_kv, D in ((9, 3, 64), (14, 2, 64), (32, 8, 64), (12, 2, 128), (48, 1, 128))
    for S_max, pos in ((1, 0), (1000, 700), (8192, 8191))
    for dtype, rope, combine in ((F16, "llama3", True), (BF16, None, False), (F32, "plain", True))
] + [(F16, 64, 32, 8, 64, 2048, 2000, True, None, "plain", True), (BF16, 4, 24, 8, 128, 5000, 4999, True, 1, "random", True)]


@pytest.mark.parametrize(
    "dtype,B,H,H_kv,D,S_max,pos,pad,n_split,rope,combine",
    [pytest.param(*c) for c in GQA_CPU] + [cuda_case(*c) for c in GQA_CUDA],
)
def test_grouped_decode_matches_reference_and_appends_rotated_keys(
    launches, dtype, B, H, H_kv, D, S_max, pos, pad, n_split, rope, combine
):
    run_decode_case(launches, dtype, B, H, D, S_max, pos, pad, n_split, n_kv_head=H_kv, rope=rope, combine=combine)


@pytest.mark.parametrize(
    "config", AD.DECODE_GROUP_CONFIGS, ids=lambda c: "N{BLOCK_N}w{num_warps}s{num_stages}".format(**c)
)
def test_grouped_decode_every_config(launches, config):
    dtype = F32 if config in AD.decode_group_configs_for(64, F32) else F16
    S_max = 2 * config["BLOCK_N"] + 10
    run_decode_case(launches, dtype, 1, 6, 64, S_max, S_max - 3, False, 2, config=config, n_kv_head=2, rope="plain")


def test_grouped_decode_steps_from_an_empty_cache_equal_full_causal_attention(launches):
    """Token by token from slot 0 (rotated keys written by one step are read by the next ones),
    against one causal reference pass; row 1 is left-padded (its positions restart at 0)."""
    B, H, H_kv, D, steps, dtype = 2, 6, 2, 64, 5, F32
    q, k, v = fused_qkv_gqa(B, steps, H, H_kv, D, dtype)
    inv_freq = rope_freqs("llama3", D)
    row_start = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    kc = torch.full((B, H_kv, steps + 3, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = nan_like(kc)
    ws = AD.decode_workspace(B, H, D, steps + 3, DEVICE, n_split=1, n_kv_head=H_kv)
    outs = []
    for t in range(steps):
        sl = slice(t, t + 1)
        pos = torch.tensor([t], dtype=torch.int32, device=DEVICE)
        outs.append(AD.decode_attention(q[:, sl], k[:, sl], v[:, sl], kc, vc, pos, row_start, ws, rope=inv_freq))
    kr = torch.zeros(B, H_kv, steps + 3, D, dtype=torch.float64, device=DEVICE)
    vr = torch.zeros_like(kr)
    ref = reference.attention(q.double(), k.double(), v.double(), kr, vr, 0, row_start, rope=inv_freq)
    assert launches["_decode_split_kernel"] == steps
    for t, out in enumerate(outs):
        assert_close(out, ref[:, t : t + 1], dtype, f"step {t}")
    assert_close(kc[:, :, :steps], kr[:, :, :steps], dtype, "rotated keys in the cache")
    assert torch.equal(vc[:, :, :steps], v.transpose(1, 2))


@pytest.mark.parametrize("n_split", [1, 3])
def test_grouped_decode_out_of_range_cache_pos_gives_nan_and_writes_nothing(launches, n_split):
    B, H, H_kv, D, S = 1, 4, 2, 64, 48
    q, k, v = fused_qkv_gqa(B, 1, H, H_kv, D, F32)
    kc = torch.randn(B, H_kv, S, D, device=DEVICE)
    vc = torch.randn(B, H_kv, S, D, device=DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    ws = AD.decode_workspace(B, H, D, S, DEVICE, n_split=n_split)
    out = AD.decode_attention(
        q, k, v, kc, vc, torch.tensor([S], dtype=torch.int32, device=DEVICE),
        torch.zeros(B, dtype=torch.int32, device=DEVICE), ws, rope=rope_freqs("plain", D),
    )
    assert out.isnan().all()
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@triton.jit
def _sincos_probe(x_ptr, sin_ptr, cos_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    sin, cos = AD._sincos(tl.load(x_ptr + offs))
    tl.store(sin_ptr + offs, sin)
    tl.store(cos_ptr + offs, cos)


@pytest.mark.parametrize("limit", [6000.0, cuda_case(1.0e6)])
def test_rotary_sincos_is_float32_accurate(limit):
    """The kernel's sin/cos (own range reduction, see AD._sincos) within 2e-7 of float64, over
    angles up to ``limit`` (the interpreter evaluates tl.fma unfused: exact up to ~6000 only)."""
    x = torch.cat([torch.linspace(-10.0, 10.0, 1024), torch.rand(3072) * limit]).float().to(DEVICE)
    sin, cos = torch.empty_like(x), torch.empty_like(x)
    _sincos_probe[(1,)](x, sin, cos, N=x.numel())
    assert (sin.double() - x.double().sin()).abs().max().item() < 2e-7
    assert (cos.double() - x.double().cos()).abs().max().item() < 2e-7


# --------------------------------------------------------------------------------------------
# Split heuristic and workspace
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch,n_head,max_len,n_kv_head",
    [(1, 12, 128, None), (1, 12, 1024, None), (1, 12, 8192, None), (8, 25, 8192, None), (64, 12, 8192, None),
     (256, 25, 1024, None), (1, 1, 1, None), (3, 5, 1000, None),
     (1, 32, 8192, 8), (8, 14, 4096, 2), (1, 9, 2048, 3), (16, 32, 1024, 8), (1, 48, 100, 1)],
)
def test_decode_num_splits_depends_on_shape_only_and_covers_the_cache(batch, n_head, max_len, n_kv_head):
    n_split = AD.decode_num_splits(batch, n_head, max_len, n_kv_head=n_kv_head)
    chunk = AD.decode_chunk(max_len, n_split)
    assert n_split == AD.decode_num_splits(batch, n_head, max_len, n_kv_head=n_kv_head) >= 1
    assert chunk & (chunk - 1) == 0, "chunk is a power of two"
    assert n_split * chunk >= max_len > (n_split - 1) * chunk, "every split owns slots, all slots are owned"
    assert chunk >= min(AD.DECODE_MIN_CHUNK, max(16, max_len)) or n_split == 1
    # Enough programs (one per row, K/V head and split) to fill the GPU unless chunks are already
    # at their minimum size.
    programs = batch * (n_kv_head or n_head) * n_split
    assert programs >= AD.DECODE_TARGET_PROGRAMS or chunk <= AD.DECODE_MIN_CHUNK or n_split == 1
    if n_kv_head is None:  # the default is no grouping
        assert n_split == AD.decode_num_splits(batch, n_head, max_len, n_kv_head=n_head)
    ws = AD.decode_workspace(batch, n_head, 64, max_len, "cpu", n_kv_head=n_kv_head)
    assert ws["attn_o"].shape == (batch, n_head, n_split, 64), "partials per query head"
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in ws.values())


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, raised before any kernel runs
# --------------------------------------------------------------------------------------------
def _valid_decode_args(dtype=F16):
    B, H, D, S = 2, 3, 64, 8
    q, k, v = fused_qkv(B, 1, H, D, dtype)
    kc = torch.zeros(B, H, S, D, dtype=dtype, device=DEVICE)
    return dict(
        q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone(),
        cache_pos=torch.tensor([3], dtype=torch.int32, device=DEVICE),
        row_start=torch.zeros(B, dtype=torch.int32, device=DEVICE),
        workspace=AD.decode_workspace(B, H, D, S, DEVICE, n_split=2),
    )


DECODE_BAD = [
    ("two tokens", lambda a: a.update(**dict(zip("qkv", fused_qkv(2, 2, 3, 64, F16)))), ValueError, "one token per row"),
    ("q bf16 vs cache f16", lambda a: a.update(q=a["q"].to(BF16)), TypeError, "k must have dtype"),
    ("cache_pos int64", lambda a: a.update(cache_pos=a["cache_pos"].long()), TypeError, "cache_pos must have dtype"),
    ("cache_pos shape (2,)", lambda a: a.update(cache_pos=torch.zeros(2, dtype=torch.int32, device=DEVICE)), ValueError, "cache_pos must have shape"),
    ("cache_pos 0-d", lambda a: a.update(cache_pos=torch.tensor(3, dtype=torch.int32, device=DEVICE)), ValueError, "cache_pos must have 1 dimensions"),
    ("workspace not a dict", lambda a: a.update(workspace=[1]), TypeError, "workspace must be the dict"),
    ("workspace missing key", lambda a: a["workspace"].pop("attn_m"), ValueError, "missing 'attn_m'"),
    ("workspace wrong heads", lambda a: a.update(workspace=AD.decode_workspace(2, 2, 64, 8, DEVICE)), ValueError, r"workspace\['attn_o'\]"),
    ("workspace wrong dtype", lambda a: a["workspace"].update(attn_l=a["workspace"]["attn_l"].half()), TypeError, r"workspace\['attn_l'\]"),
    ("workspace splits > S_max", lambda a: a.update(workspace={
        "attn_o": torch.zeros(2, 3, 9, 64, device=DEVICE), "attn_m": torch.zeros(2, 3, 9, device=DEVICE),
        "attn_l": torch.zeros(2, 3, 9, device=DEVICE)}), ValueError, "n_split must be in"),
    ("row_start on wrong batch", lambda a: a.update(row_start=torch.zeros(1, dtype=torch.int32, device=DEVICE)), ValueError, "row_start"),
    ("k_cache 3-D", lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache must have 4 dimensions"),
    ("out wrong shape", lambda a: a.update(out=torch.empty(2, 2, 3, 64, dtype=F16, device=DEVICE)), ValueError, "out must have shape"),
    # Grouped-query heads and rotary frequencies.
    ("H not a multiple of H_kv", lambda a: a.update(**dict(zip("qkv", fused_qkv_gqa(2, 1, 3, 2, 64, F16)))), ValueError,
     "H_kv dividing q's 3 heads"),
    ("cache with q's heads", lambda a: a.update(**dict(zip("qkv", fused_qkv_gqa(2, 1, 3, 1, 64, F16)))), ValueError,
     r"k_cache must be \(B=2, H_kv=1"),
    ("workspace per K/V head", lambda a: a.update(
        **dict(zip("qkv", fused_qkv_gqa(2, 1, 3, 1, 64, F16))), k_cache=a["k_cache"][:, :1].contiguous(), v_cache=a["v_cache"][:, :1].contiguous(),
        workspace=AD.decode_workspace(2, 1, 64, 8, DEVICE)), ValueError, r"workspace\['attn_o'\] must be contiguous \(B=2, H=3"),
] + ROPE_BAD


@pytest.mark.parametrize("name,mutate,exc,match", DECODE_BAD, ids=[c[0] for c in DECODE_BAD])
def test_decode_rejects_bad_inputs(launches, name, mutate, exc, match):
    a = _valid_decode_args()
    mutate(a)
    with pytest.raises(exc, match=match):
        AD.decode_attention(**a)
    assert sum(launches.values()) == 0


def test_workspace_and_split_helpers_reject_bad_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        AD.decode_workspace(1, 1, 80, 16, "cpu")
    with pytest.raises(ValueError, match="n_split"):
        AD.decode_workspace(1, 1, 64, 16, "cpu", n_split=17)
    with pytest.raises(ValueError, match="n_split"):
        AD.decode_workspace(1, 1, 64, 16, "cpu", n_split=0)
    with pytest.raises(ValueError, match="max_len"):
        AD.decode_num_splits(1, 1, 0)
    for n_kv_head in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="n_kv_head"):
            AD.decode_num_splits(1, 4, 16, n_kv_head=n_kv_head)
        with pytest.raises(ValueError, match="n_kv_head"):
            AD.decode_workspace(1, 4, 64, 16, "cpu", n_kv_head=n_kv_head)
        with pytest.raises(ValueError, match="n_kv_head"):
            AD.decode_workspace(1, 4, 64, 16, "cpu", n_split=2, n_kv_head=n_kv_head)


@pytest.mark.cuda
def test_decode_refuses_to_autotune_during_graph_capture(launches, monkeypatch):
    # Simulate capture (a real aborted capture could leave the stream unusable for later tests).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a = _valid_decode_args()
    a["workspace"] = AD.decode_workspace(2, 3, 64, 8, DEVICE, n_split=5)  # a key never tuned before
    with pytest.raises(RuntimeError, match="warmup_decode"):
        AD.decode_attention(**a)
    # The grouped path with rope has its own tuner and keys.
    q, k, v = fused_qkv_gqa(2, 1, 4, 2, 64, F16)
    kc = torch.zeros(2, 2, 8, 64, dtype=F16, device=DEVICE)
    with pytest.raises(RuntimeError, match="warmup_decode"):
        AD.decode_attention(
            q, k, v, kc, kc.clone(), a["cache_pos"], a["row_start"], AD.decode_workspace(2, 4, 64, 8, DEVICE, n_split=5),
            rope=rope_freqs("plain", 64),
        )
    assert launches["_decode_split_kernel"] == 0


# --------------------------------------------------------------------------------------------
# CUDA graphs: the way the model runs decode
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,B,H,n_split", [(F16, 3, 12, None), (BF16, 1, 25, None), (F32, 2, 12, 1)])
def test_decode_replayed_from_a_cuda_graph_matches_reference(launches, dtype, B, H, n_split):
    D, max_len, T0, steps = 64, 700, 250, 12
    total = T0 + steps
    qkv_all = torch.randn(B, total, 3 * H * D, device="cuda").to(dtype)
    q, k, v = qkv_all.view(B, total, 3, H, D).unbind(2)
    row_start = make_row_start(B, T0 - 1, pad=True)
    cache = KVCache(1, B, H, max_len, D, dtype, "cuda")
    cache.set_row_start(row_start)
    kc, vc = cache.layer(0)
    workspace = AD.decode_workspace(B, H, D, max_len, "cuda", n_split=n_split)
    AP.prefill_attention(q[:, :T0], k[:, :T0], v[:, :T0], kc, vc, cache.row_start)
    cache.advance(T0)

    # Static decode inputs: one fused (B, 1, 3*H*D) buffer, as the model's QKV projection output.
    static_qkv = torch.zeros(B, 1, 3 * H * D, device="cuda", dtype=dtype)
    sq, sk, sv = static_qkv.view(B, 1, 3, H, D).unbind(2)
    static_out = torch.zeros(B, 1, H, D, device="cuda", dtype=dtype)
    AD.warmup_decode(sq, sk, sv, kc, vc, cache.row_start, workspace)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        AD.decode_attention(sq, sk, sv, kc, vc, cache.pos_tensor, cache.row_start, workspace, out=static_out)

    outs = []
    for t in range(T0, total):
        static_qkv.copy_(qkv_all[:, t : t + 1])
        graph.replay()
        outs.append(static_out.clone())
        cache.advance(1)
    torch.cuda.synchronize()

    ref = prefill_reference(q, k, v, max_len, row_start)
    for i, out in enumerate(outs):
        assert_close(out, ref[:, T0 + i : T0 + i + 1], dtype, f"graph replay step {i}")
    assert torch.equal(kc[:, :, :total], k.transpose(1, 2))
    assert torch.equal(vc[:, :, :total], v.transpose(1, 2))


@pytest.mark.parametrize(
    "dtype,B,H,H_kv,D,max_len,T0,steps,n_split,combine",
    [
        pytest.param(F16, 2, 4, 1, 64, 40, 30, 2, 3, False),  # interpreter: partials -> out-projection prologue
        cuda_case(F16, 3, 32, 8, 64, 700, 250, 10, None, True),
        cuda_case(BF16, 2, 14, 2, 128, 700, 250, 10, None, False),
        cuda_case(F32, 1, 9, 3, 64, 700, 250, 10, 1, True),
        cuda_case(F16, 1, 48, 1, 128, 3000, 2900, 10, None, False),
    ],
)
def test_grouped_rope_decode_steps_match_reference(launches, dtype, B, H, H_kv, D, max_len, T0, steps, n_split, combine):
    """Decode steps with rope at advancing positions over a random history (slots < T0), against the
    reference on a float64 copy of the cache. ``combine=False`` is the model's step: the partials
    combined by the out-projection GEMV's prologue (kernels.linear, ``attn_partials``). On a GPU
    the step is captured once in a CUDA graph and replayed (the position is read on the device)."""
    import fastgpt.kernels.linear as KL

    device = DEVICE
    inv_freq = rope_freqs("llama3", D)
    row_start = make_row_start(B, T0 - 1, pad=True)
    kc = torch.randn(B, H_kv, max_len, D, device=device).to(dtype)
    vc = torch.randn_like(kc)
    kr, vr = kc.double(), vc.double()  # the reference's cache, updated by each reference step
    q_all, k_all, v_all = fused_qkv_gqa(B, steps, H, H_kv, D, dtype)
    static_q, static_k, static_v = (torch.zeros_like(t[:, :1]) for t in (q_all, k_all, v_all))
    static_out = torch.zeros(B, 1, H, D, device=device, dtype=dtype)
    pos = torch.tensor([T0], dtype=torch.int32, device=device)
    workspace = AD.decode_workspace(B, H, D, max_len, device, n_split=n_split, n_kv_head=H_kv)
    weight = (torch.randn(48, H * D, device=device) / (H * D) ** 0.5).to(dtype)

    def step():
        if combine:
            return AD.decode_attention(
                static_q, static_k, static_v, kc, vc, pos, row_start, workspace, out=static_out, rope=inv_freq
            )
        partials = AD.decode_attention(static_q, static_k, static_v, kc, vc, pos, row_start, workspace, combine=False, rope=inv_freq)
        return KL.linear(None, weight, attn_partials=partials)

    if HAS_CUDA:
        AD.warmup_decode(static_q, static_k, static_v, kc, vc, row_start, workspace, rope=inv_freq)  # writes the last slot
        step()  # eager warm-up of every kernel of the step (slot T0 is rewritten by the first replay)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = step()
    for t in range(steps):
        for static, full in ((static_q, q_all), (static_k, k_all), (static_v, v_all)):
            static.copy_(full[:, t : t + 1])
        if HAS_CUDA:
            graph.replay()
            torch.cuda.synchronize()
        else:
            result = step()
        ref = reference.attention(
            q_all[:, t : t + 1].double(), k_all[:, t : t + 1].double(), v_all[:, t : t + 1].double(), kr, vr, T0 + t,
            row_start, rope=inv_freq,
        )
        if not combine:
            ref = reference.linear(ref.to(dtype).double().flatten(2), weight.double(), None)
        assert_close(result, ref, dtype, f"step {t}")
        pos += 1
    assert_close(kc[:, :, T0 : T0 + steps], kr[:, :, T0 : T0 + steps], dtype, "rotated keys in the cache")


# --------------------------------------------------------------------------------------------
# sm_90 compile check of every (kernel, config) the autotuner may pick (runs on the CPU)
# --------------------------------------------------------------------------------------------
def _compile_worker() -> None:
    """Subprocess entry (tests.kernel_helpers.run_compile_workers): compile the specs read as JSON
    from stdin for sm_90, print JSON results.

    Pointer and stride arguments are marked 16-divisible, as Triton specialises them at a real
    launch (16-byte aligned tensors, strides multiples of head_dim): that alignment is what lets it
    vectorise the loads and software-pipeline the grouped kernel's K/V tiles (cp.async), so the
    kernel checked here is the one that runs. Runs without TRITON_INTERPRET (real JITFunctions).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {"split": AD._decode_split_kernel, "combine": AD._decode_combine_kernel}
    results = []
    for kind, dt, head_dim, extra, cfg in json.loads(sys.stdin.read()):
        kernel = kernels[kind]
        constexprs = {"HEAD_DIM": head_dim, **extra, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}}
        if kind == "split":
            # The decode step's kernel as it runs on sm_90 (programmatic dependent launch on).
            constexprs.update(IEEE=dt == "fp32", UPCAST=False, USE_PDL=True)
        signature, attrs = kernel_signature(kernel, constexprs, dt, aligned=True)
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
        )
        ptx = compiled.asm["ptx"]
        results.append({
            "spec": [kind, dt, head_dim, extra, cfg], "shared": compiled.metadata.shared, "mma": "mma" in ptx,
            "cp_async": "cp.async" in ptx, "spills": spill_bytes(compiled.asm["cubin"]),
            "pdl": ["griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx],
        })  # fmt: skip
    print(json.dumps(results))


def _split_specs(block_g: int, rope: bool, cases) -> list:
    configs_for = AD.decode_configs_for if block_g == 1 else (
        lambda d, dt: AD.decode_group_configs_for(d, {"fp32": F32, "fp16": F16, "bf16": BF16}[dt])
    )
    return [
        ("split", dt, d, {"BLOCK_G": block_g, "ROPE": rope}, c)
        for dt, d in cases
        for c in (configs_for(d) if block_g == 1 else configs_for(d, dt))
    ]  # fmt: skip


def test_every_decode_config_compiles_for_sm90_without_spills():
    """Every config of both split paths at head_dim 64 and 128, with and without rope, every dtype
    somewhere (19 compiles, ~2 s each), and the combine kernel: no register spill (nor stack), shared memory within
    an H100's, PDL on, the grouped path's 16-bit dots on tensor cores and its K/V loads pipelined.

    Groups G = H / H_kv in {2, 3, 4, 6, 7, 8} (and any larger one, in 16-head programs) all run
    the BLOCK_G = 16 kernel (GROUP is a runtime argument), G = 1 the BLOCK_G = 1 one."""
    assert {AD.decode_group_block(g) for g in (2, 3, 4, 6, 7, 8, 14, 48)} == {16} and AD.decode_group_block(1) == 1
    params = inspect.signature(AD._decode_split_kernel.fn).parameters
    assert params["GROUP"].annotation is inspect.Parameter.empty and "constexpr" in str(params["BLOCK_G"].annotation)
    # Rope only adds prologue code: the largest tiles (head_dim 128) run with and without it.
    specs = _split_specs(1, False, (("fp32", 128), ("fp16", 64)))  # GPT-2's path
    specs += _split_specs(1, True, (("bf16", 128),))
    specs += _split_specs(16, True, (("fp16", 64), ("bf16", 128), ("fp32", 128)))
    specs += _split_specs(16, False, (("fp32", 128),))
    for block_g, configs in ((1, AD.DECODE_CONFIGS), (16, AD.DECODE_GROUP_CONFIGS)):  # each config somewhere
        assert {json.dumps(s[4]) for s in specs if s[3]["BLOCK_G"] == block_g} == {json.dumps(c) for c in configs}
    specs += [("combine", dt, d, {}, AD.COMBINE_CONFIG) for dt, d in (("fp32", 128), ("bf16", 64))]
    from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES

    for r in run_compile_workers("test_attention_decode", specs):
        kind, dt, _, extra, cfg = r["spec"]
        assert r["spills"] == 0, f"{r['spec']} spills {r['spills']} B to local memory"
        assert r["shared"] <= H100_SHARED_MEMORY_BYTES, f"{r['spec']} needs {r['shared']} B of shared memory"
        if kind == "split":
            assert r["pdl"] == [True, True], f"{r['spec']}: griddepcontrol.wait / launch_dependents missing"
            grouped = extra["BLOCK_G"] > 1
            assert r["mma"] == (grouped and dt != "fp32"), f"{r['spec']}: tensor cores for 16-bit group dots only"
            assert r["cp_async"] == (grouped and cfg["num_stages"] > 1), f"{r['spec']}: K/V loads pipelining"


def test_autotuner_configs_are_the_exported_lists():
    def listed(configs):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]

    tuner = AD._decode_split_tuned
    assert listed(tuner.configs) == AD.DECODE_CONFIGS
    for head_dim in (64, 128):  # the prune the tuner applies is decode_configs_for
        kept = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=head_dim)
        assert listed(kept) == AD.decode_configs_for(head_dim)
    assert [c["BLOCK_N"] for c in AD.decode_configs_for(128)] == [32, 64]  # 128 x 128 spills
    group = AD._decode_group_tuned
    assert listed(group.configs) == AD.DECODE_GROUP_CONFIGS and group.fn is AD._decode_split_kernel
    for head_dim in (64, 128):
        for dtype in DTYPES:
            named = {"q_ptr": torch.empty(0, dtype=dtype)}
            kept = group.early_config_prune(group.configs, named, HEAD_DIM=head_dim, BLOCK_G=16, ROPE=True)
            assert listed(kept) == AD.decode_group_configs_for(head_dim, dtype)
            assert kept == group.configs or dtype == F32
    assert len(AD.decode_group_configs_for(128, F32)) == 2  # float32 x 128: no 3-stage or 128-key tiles
    for tuner in (tuner, group):
        assert set(tuner.keys) <= set(tuner.arg_names) and "ROPE" in tuner.keys


# --------------------------------------------------------------------------------------------
# The autotuned launch path, exercised on the CPU with the interpreted kernels
# --------------------------------------------------------------------------------------------
def test_autotuned_launch_path_passes_keys_and_meta_correctly(launches, monkeypatch):
    """The GPU launch code (autotuner call, grid from the chosen config, key names), run under the
    interpreter with small configs and a wall-clock benchmark in place of the CUDA one."""
    import triton

    for tuner in (AP._prefill_tuned, AP._prefill_tuned_fp32, AD._decode_split_tuned, AD._decode_group_tuned):
        assert set(tuner.keys) <= set(tuner.arg_names), "every autotune key must be a kernel argument"
        assert "cache_pos" not in tuner.keys and "pos_ptr" not in tuner.keys

    def cpu_bench(fn, quantiles=None):
        fn()
        return [1.0, 1.0, 1.0]

    def tuned(kernel, tuner, configs):
        return triton.autotune(
            configs=[triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                   num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs],
            key=tuner.keys, do_bench=cpu_bench,
        )(kernel)

    small_prefill = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)]
    small_decode = [dict(BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_N=32, num_warps=4, num_stages=1)]
    monkeypatch.setattr(AP, "_prefill_tuned", tuned(AP._prefill_kernel, AP._prefill_tuned, small_prefill))
    monkeypatch.setattr(AP, "_prefill_tuned_fp32", tuned(AP._prefill_kernel, AP._prefill_tuned_fp32, small_prefill[1:]))
    monkeypatch.setattr(AD, "_decode_split_tuned", tuned(AD._decode_split_kernel, AD._decode_split_tuned, small_decode))
    monkeypatch.setattr(AP, "interpreting", lambda: False)
    monkeypatch.setattr(AD, "interpreting", lambda: False)
    monkeypatch.setattr(AC, "triton_usable_on", lambda device: True)

    for dtype in (F16, F32):  # not bf16: without UPCAST the interpreter's bf16 dot is wrong
        B, T, H, D, S = 2, 37, 2, 64, 60
        q, k, v = fused_qkv(B, T, H, D, dtype)
        row_start = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
        kc = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)
        vc = nan_like(kc)
        out = AP.prefill_attention(q, k, v, kc, vc, row_start)
        assert_close(out, prefill_reference(q, k, v, S, row_start), dtype, "autotuned prefill")
        qd, kd, vd = fused_qkv(B, 1, H, D, dtype)
        ws = AD.decode_workspace(B, H, D, S, DEVICE, n_split=3)
        pos = torch.tensor([T], dtype=torch.int32, device=DEVICE)
        out_d = AD.decode_attention(qd, kd, vd, kc, vc, pos, row_start, ws)
        kr, vr = kc.double().nan_to_num(0.0), vc.double().nan_to_num(0.0)
        kr[:, :, T] = 0.0
        ref = reference.attention(qd.double(), kd.double(), vd.double(), kr, vr, T, row_start)
        assert_close(out_d, ref, dtype, "autotuned decode")
    assert launches["_prefill_kernel"] >= 4 and launches["_decode_split_kernel"] >= 4
    assert launches["_decode_combine_kernel"] == 2


def test_grouped_autotuned_launch_path(launches, monkeypatch):
    """The group tuner's launch (keys, prune with the kernel's meta-parameters, grid per K/V head)
    under the interpreter, with two small configs and a dummy benchmark."""
    calls = []

    def cpu_bench(fn, quantiles=None):
        fn()
        return [1.0, 1.0, 1.0]

    def prune(configs, named_args, **kwargs):
        calls.append((named_args["q_ptr"].dtype, kwargs["HEAD_DIM"], kwargs["BLOCK_G"], kwargs["ROPE"]))
        return configs

    small = [dict(BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_N=32, num_warps=4, num_stages=2)]
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in small],
        key=AD._decode_group_tuned.keys, do_bench=cpu_bench, prune_configs_by={"early_config_prune": prune},
    )(AD._decode_split_kernel)
    monkeypatch.setattr(AD, "_decode_group_tuned", tuned)
    monkeypatch.setattr(AD, "interpreting", lambda: False)
    monkeypatch.setattr(AC, "triton_usable_on", lambda device: True)
    for dtype in (F16, F32):  # not bf16: without UPCAST the interpreter's bf16 dot is wrong
        launches.clear()
        run_decode_case(launches, dtype, 1, 4, 64, 40, 33, False, 2, n_kv_head=2, rope="plain")
        assert launches["_decode_split_kernel"] == len(small) + 1  # each config timed once, then the launch
    assert calls == [(F16, 64, 16, True), (F32, 64, 16, True)]
