"""Tests of the Triton attention kernels (kernels/attention.py) against fastgpt.reference.attention.

The oracle runs in float64 on copies of the inputs. Every launch writes into outputs, caches and
split workspaces poisoned with NaN, so an element a kernel forgets to write fails the test, and a
spy on the kernels' ``run`` proves the Triton path ran (there is no fallback to hide behind).

Without a GPU the kernels run in the Triton interpreter on a small, representative subset (several
key blocks, left padding, all-pad rows, several decode splits, every autotune config at a tiny
size); the full shape matrix, CUDA graphs and the autotuned path are marked ``cuda``.

Tolerances (never loosened to get green; derived from the output dtype's rounding):
* float32 (IEEE dots, no TF32): relative error ||out - ref|| / ||ref|| < 1e-3 and
  |out - ref| <= 1e-4 + 1e-3 |ref| elementwise.
* float16: relative < 1e-2, elementwise 2e-3 + 5e-3 |ref| (half an fp16 ulp is 2^-11 |x|).
* bfloat16: relative < 1e-2, elementwise 1e-2 + 1.6e-2 |ref| (half a bf16 ulp is 2^-8 |x| = 0.0039 |x|,
  plus the bf16 rounding of the softmax weights before the P @ V product).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import reference
from fastgpt.kv_cache import KVCache
from fastgpt.kernels import attention as attn
from tests.kernel_helpers import run_compile_workers, spill_bytes
from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPO_ROOT = Path(__file__).resolve().parent.parent

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
#: dtype -> (relative-norm tolerance, atol, rtol)
TOL = {F32: (1e-3, 1e-4, 1e-3), F16: (1e-2, 2e-3, 5e-3), BF16: (1e-2, 1e-2, 1.6e-2)}

KERNELS = ("_prefill_kernel", "_decode_split_kernel", "_decode_combine_kernel")


def cuda_case(*values):
    return pytest.param(*values, marks=pytest.mark.cuda)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Count the launches of each attention kernel (wraps the kernels' ``run``)."""
    counts = collections.Counter()
    for name in KERNELS:
        kernel = getattr(attn, name)
        original = kernel.run

        def spy(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return counts


def fused_qkv(B: int, T: int, H: int, D: int, dtype, device=DEVICE, scale: float = 1.0):
    """q, k, v (B, T, H, D) as the model makes them: views of one fused (B, T, 3*H*D) projection."""
    qkv = (torch.randn(B, T, 3 * H * D, device=device, dtype=torch.float32) * scale).to(dtype)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    assert q.stride(1) == 3 * H * D and q.stride(-1) == 1  # row stride 3C: not contiguous
    return q, k, v


def make_row_start(B: int, T: int, pad: bool, device=DEVICE) -> torch.Tensor:
    """Left padding per row: row 0 none, row 1 a few pads crossing a block, row 2 pads everything."""
    if not pad:
        return torch.zeros(B, dtype=torch.int32, device=device)
    choices = [0, min(T - 1, T // 2 + 3), T][:B] if B > 1 else [T // 3]
    choices += [(5 * b) % (T + 1) for b in range(len(choices), B)]
    return torch.tensor(choices, dtype=torch.int32, device=device)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype, what: str = "") -> None:
    rel_tol, atol, rtol = TOL[dtype]
    out64 = out.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (unwritten or NaN) at {(~torch.isfinite(out64)).nonzero()[:5].tolist()}"
    err = (out64 - ref).abs()
    ref_norm = ref.norm().item()
    if ref_norm > 0:
        rel = (out64 - ref).norm().item() / ref_norm
        assert rel < rel_tol, f"{what}: relative error {rel:.3e} >= {rel_tol}"
    excess = err - (atol + rtol * ref.abs())
    worst = excess.argmax()
    assert excess.max().item() <= 0, (
        f"{what}: |out - ref| = {err.flatten()[worst].item():.3e} > {atol} + {rtol}|ref| "
        f"at flat index {worst.item()} (ref {ref.flatten()[worst].item():.4f})"
    )


def prefill_reference(q, k, v, S_max: int, row_start) -> torch.Tensor:
    B, T, H, D = q.shape
    kc = torch.zeros(B, H, S_max, D, dtype=torch.float64, device=q.device)
    vc = torch.zeros_like(kc)
    return reference.attention(q.double(), k.double(), v.double(), kc, vc, 0, row_start)


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------
# (B, T, H, D, S_max, pad). CPU: the interpreter's blocks are 16 x 16, so T = 33 spans 3 blocks.
PREFILL_CPU = [
    (1, 1, 1, 64, 1, False),
    (3, 7, 3, 64, 9, True),
    (2, 33, 1, 128, 40, True),
]
PREFILL_CUDA = [
    (B, T, H, D, T + 5, B == 3)
    for B in (1, 3)
    for H in (1, 12, 25)
    for D in (64, 128)
    for T in (1, 7, 128, 1000)
] + [(1, 4096, 12, 64, 4096, True), (256, 17, 25, 64, 64, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,T,H,D,S_max,pad", [pytest.param(*c) for c in PREFILL_CPU] + [cuda_case(*c) for c in PREFILL_CUDA]
)
def test_prefill_matches_reference_and_fills_cache(launches, dtype, B, T, H, D, S_max, pad):
    q, k, v = fused_qkv(B, T, H, D, dtype)
    row_start = make_row_start(B, T, pad)
    k_cache = torch.full((B, H, S_max, D), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = nan_like(k_cache)
    out = torch.full((B, T, H, D), float("nan"), dtype=dtype, device=DEVICE)

    result = attn.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out)

    assert launches["_prefill_kernel"] >= 1
    assert result is out
    assert_close(out, prefill_reference(q, k, v, S_max, row_start), dtype, "prefill output")
    # The cache holds exactly the projected K/V in slots [0, T); later slots are untouched.
    assert torch.equal(k_cache[:, :, :T], k.transpose(1, 2))
    assert torch.equal(v_cache[:, :, :T], v.transpose(1, 2))
    assert k_cache[:, :, T:].isnan().all() and v_cache[:, :, T:].isnan().all()


def test_prefill_allocates_output_and_zeroes_pad_queries(launches):
    B, T, H, D = 2, 20, 2, 64
    q, k, v = fused_qkv(B, T, H, D, F16)
    row_start = torch.tensor([20, 9], dtype=torch.int32, device=DEVICE)  # row 0 is all padding
    k_cache = torch.zeros(B, H, T, D, dtype=F16, device=DEVICE)
    out = attn.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), row_start)
    assert launches["_prefill_kernel"] == 1
    assert out.shape == (B, T, H, D) and out.dtype == F16 and out.is_contiguous()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :9], torch.zeros_like(out[1, :9]))
    assert_close(out, prefill_reference(q, k, v, T, row_start), F16, "prefill")


def test_prefill_out_may_be_a_strided_view_of_a_flat_buffer(launches):
    B, T, H, D = 2, 19, 3, 64
    q, k, v = fused_qkv(B, T, H, D, F32)
    row_start = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    # (B, T, H*D + 8) buffer: out rows are not contiguous, the tail of each row must stay NaN.
    flat = torch.full((B, T, H * D + 8), float("nan"), dtype=F32, device=DEVICE)
    out = flat[:, :, : H * D].view(B, T, H, D)
    k_cache = torch.zeros(B, H, 32, D, dtype=F32, device=DEVICE)
    attn.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), row_start, out=out)
    assert_close(out, prefill_reference(q, k, v, 32, row_start), F32, "prefill into a view")
    assert flat[:, :, H * D :].isnan().all()


def test_prefill_negative_row_start_means_no_padding():
    B, T, H, D = 2, 10, 1, 64
    q, k, v = fused_qkv(B, T, H, D, F32)
    k_cache = torch.zeros(B, H, T, D, dtype=F32, device=DEVICE)
    out = attn.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), torch.tensor([-3, 0], dtype=torch.int32, device=DEVICE))
    ref = prefill_reference(q, k, v, T, torch.zeros(B, dtype=torch.int32, device=DEVICE))
    assert_close(out, ref, F32, "negative row_start")


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
def run_decode_case(launches, dtype, B, H, D, S_max, pos, pad, n_split, config=None):
    """One decode step at slot ``pos`` over a random cache; checks output, cache and launches."""
    row_start = make_row_start(B, pos + 1, pad)
    # Valid history in slots [0, pos); pad slots hold large finite garbage that must be masked;
    # slots >= pos are NaN (slot pos must come from registers, later slots must not be read).
    k_cache = torch.randn(B, H, S_max, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(B, H, S_max, D, device=DEVICE).to(dtype)
    slot = torch.arange(S_max, device=DEVICE)
    is_pad = slot[None, :] < row_start[:, None].long()  # (B, S_max)
    k_cache[is_pad[:, None, :, None].expand_as(k_cache)] = 50.0
    v_cache[is_pad[:, None, :, None].expand_as(v_cache)] = -50.0
    k_cache[:, :, pos:] = float("nan")
    v_cache[:, :, pos:] = float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q, k, v = fused_qkv(B, 1, H, D, dtype)
    workspace = attn.decode_workspace(B, H, D, S_max, DEVICE, n_split=n_split)
    for t in workspace.values():
        t.fill_(float("nan"))
    out = torch.full((B, 1, H, D), float("nan"), dtype=dtype, device=DEVICE)
    cache_pos = torch.tensor([pos], dtype=torch.int32, device=DEVICE)

    if config is None:
        result = attn.decode_attention(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out=out)
        assert result is out
    else:
        attn._launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config=config)

    n_split = workspace["attn_o"].shape[2]
    assert launches["_decode_split_kernel"] >= 1
    assert launches["_decode_combine_kernel"] == (1 if n_split > 1 else 0)
    kr = k_before.double().nan_to_num(0.0)
    vr = v_before.double().nan_to_num(0.0)
    ref = reference.attention(q.double(), k.double(), v.double(), kr, vr, pos, row_start)
    assert_close(out, ref, dtype, f"decode (n_split={n_split})")
    # Slot pos now holds the new K/V; every other slot is bit-for-bit unchanged.
    assert torch.equal(k_cache[:, :, pos], k[:, 0])
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
    ws = attn.decode_workspace(B, H, D, S, DEVICE, n_split=4)
    out = attn.decode_attention(
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
        ws = attn.decode_workspace(B, H, D, S, DEVICE, n_split=n_split)
        out = attn.decode_attention(
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
    cache.workspace.update(attn.decode_workspace(B, H, D, max_len, DEVICE, n_split=n_split), other=torch.zeros(1))
    kc, vc = cache.layer(0)

    outs = [attn.prefill_attention(q[:, :T0], k[:, :T0], v[:, :T0], kc, vc, cache.row_start)]
    cache.advance(T0)
    for t in range(T0, total):
        sl = slice(t, t + 1)
        outs.append(
            attn.decode_attention(q[:, sl], k[:, sl], v[:, sl], kc, vc, cache.pos_tensor, cache.row_start, cache.workspace)
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


# --------------------------------------------------------------------------------------------
# Every autotune config, pinned (the interpreter runs the GPU tile sizes too, on small shapes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,config",
    [(F16, c) for c in attn.PREFILL_CONFIGS] + [(F32, c) for c in attn.PREFILL_CONFIGS_FP32],
    ids=lambda x: str(x) if isinstance(x, torch.dtype) else "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**x),
)
def test_prefill_every_config(launches, dtype, config):
    # Two query blocks. Rows: no padding (unmasked off-diagonal blocks), row_start inside the first
    # key block (its masked block then unmasked ones), row_start inside the second query block's
    # diagonal, and all padding.
    B, H, D = 4, 1, 64
    BM = config["BLOCK_M"]
    T = BM + 5
    q, k, v = fused_qkv(B, T, H, D, dtype)
    row_start = torch.tensor([0, 3, BM + 3, T], dtype=torch.int32, device=DEVICE)
    k_cache = torch.full((B, H, T + 3, D), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = nan_like(k_cache)
    out = torch.full((B, T, H, D), float("nan"), dtype=dtype, device=DEVICE)
    attn._launch_prefill(q, k, v, k_cache, v_cache, row_start, out, config=config)
    assert launches["_prefill_kernel"] == 1
    assert_close(out, prefill_reference(q, k, v, T + 3, row_start), dtype, f"prefill {config}")
    assert torch.equal(k_cache[:, :, :T], k.transpose(1, 2)) and k_cache[:, :, T:].isnan().all()


@pytest.mark.parametrize(
    "config", attn.DECODE_CONFIGS, ids=lambda c: "N{BLOCK_N}w{num_warps}".format(**c)
)
@pytest.mark.parametrize("n_split", [1, 3])
def test_decode_every_config(launches, config, n_split):
    run_decode_case(launches, F16, 2, 2, 64, 3 * config["BLOCK_N"] + 10, 3 * config["BLOCK_N"] + 1, True, n_split, config=config)


# --------------------------------------------------------------------------------------------
# Split heuristic and workspace
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch,n_head,max_len",
    [(1, 12, 128), (1, 12, 1024), (1, 12, 8192), (8, 25, 8192), (64, 12, 8192), (256, 25, 1024), (1, 1, 1), (3, 5, 1000)],
)
def test_decode_num_splits_depends_on_shape_only_and_covers_the_cache(batch, n_head, max_len):
    n_split = attn.decode_num_splits(batch, n_head, max_len)
    chunk = attn.decode_chunk(max_len, n_split)
    assert n_split == attn.decode_num_splits(batch, n_head, max_len) >= 1
    assert chunk & (chunk - 1) == 0, "chunk is a power of two"
    assert n_split * chunk >= max_len > (n_split - 1) * chunk, "every split owns slots, all slots are owned"
    assert chunk >= min(attn.DECODE_MIN_CHUNK, max(16, max_len)) or n_split == 1
    # Enough programs to fill the GPU unless chunks are already at their minimum size.
    assert batch * n_head * n_split >= attn.DECODE_TARGET_PROGRAMS or chunk <= attn.DECODE_MIN_CHUNK or n_split == 1
    ws = attn.decode_workspace(batch, n_head, 64, max_len, "cpu")
    assert ws["attn_o"].shape == (batch, n_head, n_split, 64)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in ws.values())


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, raised before any kernel runs
# --------------------------------------------------------------------------------------------
def _valid_prefill_args(dtype=F16):
    B, T, H, D, S = 2, 5, 3, 64, 8
    q, k, v = fused_qkv(B, T, H, D, dtype)
    kc = torch.zeros(B, H, S, D, dtype=dtype, device=DEVICE)
    return dict(q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone(), row_start=torch.zeros(B, dtype=torch.int32, device=DEVICE))


def _valid_decode_args(dtype=F16):
    B, H, D, S = 2, 3, 64, 8
    q, k, v = fused_qkv(B, 1, H, D, dtype)
    kc = torch.zeros(B, H, S, D, dtype=dtype, device=DEVICE)
    return dict(
        q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone(),
        cache_pos=torch.tensor([3], dtype=torch.int32, device=DEVICE),
        row_start=torch.zeros(B, dtype=torch.int32, device=DEVICE),
        workspace=attn.decode_workspace(B, H, D, S, DEVICE, n_split=2),
    )


def _head_dim_32(a):
    q, k, v = fused_qkv(2, 5, 3, 32, F16)
    kc = torch.zeros(2, 3, 8, 32, dtype=F16, device=DEVICE)
    a.update(q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone())


PREFILL_BAD = [
    ("q not a tensor", lambda a: a.update(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("q float64", lambda a: a.update(q=a["q"].double()), TypeError, "q must have dtype"),
    ("q 3-D", lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("q last dim strided", lambda a: a.update(q=a["q"].transpose(2, 3)), ValueError, "q must be contiguous in its last"),
    ("head_dim 32", _head_dim_32, ValueError, "head_dim"),
    ("k dtype differs", lambda a: a.update(k=a["k"].float()), TypeError, "k must have dtype"),
    ("v shape differs", lambda a: a.update(v=a["v"][:, :4]), ValueError, "v must have q's shape"),
    ("k_cache wrong heads", lambda a: a.update(k_cache=torch.zeros(2, 2, 8, 64, dtype=F16, device=DEVICE)), ValueError, "k_cache must be"),
    ("k_cache not contiguous", lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "k_cache must be contiguous"),
    ("v_cache S_max differs", lambda a: a.update(v_cache=torch.zeros(2, 3, 9, 64, dtype=F16, device=DEVICE)), ValueError, "v_cache must have k_cache's shape"),
    ("v_cache dtype", lambda a: a.update(v_cache=a["v_cache"].float()), TypeError, "v_cache must have dtype"),
    ("T > S_max", lambda a: a.update(k_cache=a["k_cache"][:, :, :4].contiguous(), v_cache=a["v_cache"][:, :, :4].contiguous()), ValueError, "S_max"),
    ("row_start int64", lambda a: a.update(row_start=a["row_start"].long()), TypeError, "row_start must have dtype"),
    ("row_start wrong batch", lambda a: a.update(row_start=torch.zeros(3, dtype=torch.int32, device=DEVICE)), ValueError, "row_start must have shape"),
    ("row_start 2-D", lambda a: a.update(row_start=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)), ValueError, "row_start must have 1 dimensions"),
    ("out wrong shape", lambda a: a.update(out=torch.empty(2, 5, 3, 32, dtype=F16, device=DEVICE)), ValueError, "out must have shape"),
    ("out wrong dtype", lambda a: a.update(out=torch.empty(2, 5, 3, 64, dtype=F32, device=DEVICE)), TypeError, "out must have dtype"),
]


@pytest.mark.parametrize("name,mutate,exc,match", PREFILL_BAD, ids=[c[0] for c in PREFILL_BAD])
def test_prefill_rejects_bad_inputs(launches, name, mutate, exc, match):
    a = _valid_prefill_args()
    mutate(a)
    kc_before = a["k_cache"].clone()
    with pytest.raises(exc, match=match):
        attn.prefill_attention(**a)
    assert sum(launches.values()) == 0
    assert torch.equal(a["k_cache"], kc_before)


DECODE_BAD = [
    ("two tokens", lambda a: a.update(**dict(zip("qkv", fused_qkv(2, 2, 3, 64, F16)))), ValueError, "one token per row"),
    ("q bf16 vs cache f16", lambda a: a.update(q=a["q"].to(BF16)), TypeError, "k must have dtype"),
    ("cache_pos int64", lambda a: a.update(cache_pos=a["cache_pos"].long()), TypeError, "cache_pos must have dtype"),
    ("cache_pos shape (2,)", lambda a: a.update(cache_pos=torch.zeros(2, dtype=torch.int32, device=DEVICE)), ValueError, "cache_pos must have shape"),
    ("cache_pos 0-d", lambda a: a.update(cache_pos=torch.tensor(3, dtype=torch.int32, device=DEVICE)), ValueError, "cache_pos must have 1 dimensions"),
    ("workspace not a dict", lambda a: a.update(workspace=[1]), TypeError, "workspace must be the dict"),
    ("workspace missing key", lambda a: a["workspace"].pop("attn_m"), ValueError, "missing 'attn_m'"),
    ("workspace wrong heads", lambda a: a.update(workspace=attn.decode_workspace(2, 2, 64, 8, DEVICE)), ValueError, r"workspace\['attn_o'\]"),
    ("workspace wrong dtype", lambda a: a["workspace"].update(attn_l=a["workspace"]["attn_l"].half()), TypeError, r"workspace\['attn_l'\]"),
    ("workspace splits > S_max", lambda a: a.update(workspace={
        "attn_o": torch.zeros(2, 3, 9, 64, device=DEVICE), "attn_m": torch.zeros(2, 3, 9, device=DEVICE),
        "attn_l": torch.zeros(2, 3, 9, device=DEVICE)}), ValueError, "n_split must be in"),
    ("row_start on wrong batch", lambda a: a.update(row_start=torch.zeros(1, dtype=torch.int32, device=DEVICE)), ValueError, "row_start"),
    ("k_cache 3-D", lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache must have 4 dimensions"),
    ("out wrong shape", lambda a: a.update(out=torch.empty(2, 2, 3, 64, dtype=F16, device=DEVICE)), ValueError, "out must have shape"),
]


@pytest.mark.parametrize("name,mutate,exc,match", DECODE_BAD, ids=[c[0] for c in DECODE_BAD])
def test_decode_rejects_bad_inputs(launches, name, mutate, exc, match):
    a = _valid_decode_args()
    mutate(a)
    with pytest.raises(exc, match=match):
        attn.decode_attention(**a)
    assert sum(launches.values()) == 0


def test_workspace_and_split_helpers_reject_bad_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        attn.decode_workspace(1, 1, 80, 16, "cpu")
    with pytest.raises(ValueError, match="n_split"):
        attn.decode_workspace(1, 1, 64, 16, "cpu", n_split=17)
    with pytest.raises(ValueError, match="n_split"):
        attn.decode_workspace(1, 1, 64, 16, "cpu", n_split=0)
    with pytest.raises(ValueError, match="max_len"):
        attn.decode_num_splits(1, 1, 0)


@pytest.mark.cuda
def test_cpu_tensors_are_rejected_on_a_gpu_machine(launches):
    a = _valid_prefill_args()
    a = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in a.items()}
    with pytest.raises(ValueError, match="q is on cpu"):
        attn.prefill_attention(**a)
    assert sum(launches.values()) == 0


@pytest.mark.cuda
def test_decode_refuses_to_autotune_during_graph_capture(launches, monkeypatch):
    # Simulate capture (a real aborted capture could leave the stream unusable for later tests).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a = _valid_decode_args()
    a["workspace"] = attn.decode_workspace(2, 3, 64, 8, DEVICE, n_split=5)  # a key never tuned before
    with pytest.raises(RuntimeError, match="warmup_decode"):
        attn.decode_attention(**a)
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
    workspace = attn.decode_workspace(B, H, D, max_len, "cuda", n_split=n_split)
    attn.prefill_attention(q[:, :T0], k[:, :T0], v[:, :T0], kc, vc, cache.row_start)
    cache.advance(T0)

    # Static decode inputs: one fused (B, 1, 3*H*D) buffer, as the model's QKV projection output.
    static_qkv = torch.zeros(B, 1, 3 * H * D, device="cuda", dtype=dtype)
    sq, sk, sv = static_qkv.view(B, 1, 3, H, D).unbind(2)
    static_out = torch.zeros(B, 1, H, D, device="cuda", dtype=dtype)
    attn.warmup_decode(sq, sk, sv, kc, vc, cache.row_start, workspace)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.decode_attention(sq, sk, sv, kc, vc, cache.pos_tensor, cache.row_start, workspace, out=static_out)

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


# --------------------------------------------------------------------------------------------
# sm_90 compile check of every (kernel, config) the autotuner may pick (runs on the CPU)
# --------------------------------------------------------------------------------------------
_POINTER_TYPES = {"rs_ptr": "*i32", "pos_ptr": "*i32", "o_part_ptr": "*fp32", "m_part_ptr": "*fp32", "l_part_ptr": "*fp32"}


def _compile_specs() -> list[tuple[str, str, int, dict]]:
    """(kernel, dtype, head_dim, config): every config at the largest dtype and head_dim.

    16-bit prefill configs at bfloat16/128, float32 ones at float32/128 (the IEEE FMA dots need the
    most registers), decode at float32/128 and float16/64; a head_dim of 64 only shrinks the tiles.
    """
    specs = [("prefill", "bf16", 128, c) for c in attn.PREFILL_CONFIGS]
    specs += [("prefill", "fp32", 128, c) for c in attn.PREFILL_CONFIGS_FP32]
    specs += [("decode", dt, d, c) for c in attn.DECODE_CONFIGS for dt, d in (("fp32", 128), ("fp16", 64))]
    specs += [("combine", dt, d, attn.COMBINE_CONFIG) for dt, d in (("fp32", 128), ("bf16", 64))]
    return specs


def _compile_worker() -> None:
    """Subprocess entry: compile the specs read as JSON from stdin for sm_90, print JSON results.

    Runs without TRITON_INTERPRET so that the kernels and their @triton.jit helpers are real
    JITFunctions (the interpreter's wrappers cannot be compiled).
    """
    from fastgpt.kernels.utils import compile_for_hopper

    kernels = {"prefill": attn._prefill_kernel, "decode": attn._decode_split_kernel, "combine": attn._decode_combine_kernel}
    results = []
    for kind, dt, head_dim, cfg in json.loads(sys.stdin.read()):
        kernel = kernels[kind]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        constexprs = {"HEAD_DIM": head_dim, **meta}
        if kind == "prefill":
            constexprs.update(IEEE=dt == "fp32", UPCAST=False)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = _POINTER_TYPES.get(name, "*" + dt)
            elif name == "qk_scale":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        compiled = compile_for_hopper(kernel, signature, constexprs, cfg["num_warps"], cfg["num_stages"])
        ptx = compiled.asm["ptx"]
        results.append(
            {"spec": [kind, dt, head_dim, cfg], "shared": compiled.metadata.shared, "mma": "mma" in ptx,
             "ptx_len": len(ptx), "spills": spill_bytes(compiled.asm["cubin"])}
        )
    print(json.dumps(results))


def test_autotuner_configs_are_the_exported_lists():
    def listed(tuner):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tuner.configs]

    assert listed(attn._prefill_tuned) == attn.PREFILL_CONFIGS
    assert listed(attn._prefill_tuned_fp32) == attn.PREFILL_CONFIGS_FP32
    assert listed(attn._decode_split_tuned) == attn.DECODE_CONFIGS
    assert all(c["BLOCK_M"] % c["BLOCK_N"] == 0 for c in attn.PREFILL_CONFIGS + attn.PREFILL_CONFIGS_FP32)


def test_every_autotune_config_compiles_for_sm90_within_shared_memory():
    specs = _compile_specs()
    # Two worker processes (compiles are single-threaded; ~1-8 s each), costliest specs spread.
    cost = {"prefill": 3, "decode": 1, "combine": 1}
    order = sorted(specs, key=lambda s: -cost[s[0]] * (2 if s[1] == "fp32" else 1))
    results = run_compile_workers("test_attention", order)
    for r in results:
        kind, dt, head_dim, cfg = r["spec"]
        assert r["shared"] <= H100_SHARED_MEMORY_BYTES, f"{r['spec']} needs {r['shared']} B of shared memory"
        assert r["spills"] == 0, f"{r['spec']} spills {r['spills']} B of registers to local memory"
        if kind == "prefill":
            # 16-bit dots must use the tensor cores; float32 must honour IEEE (no TF32 MMA).
            assert r["mma"] == (dt != "fp32"), r["spec"]
    covered = {(k, json.dumps(c, sort_keys=True)) for k, dt, d, c in (r["spec"] for r in results) if d == 128}
    for c in attn.PREFILL_CONFIGS + attn.PREFILL_CONFIGS_FP32:
        assert ("prefill", json.dumps(c, sort_keys=True)) in covered
    for c in attn.DECODE_CONFIGS:
        assert ("decode", json.dumps(c, sort_keys=True)) in covered


# --------------------------------------------------------------------------------------------
# The autotuned launch path, exercised on the CPU with the interpreted kernels
# --------------------------------------------------------------------------------------------
def test_autotuned_launch_path_passes_keys_and_meta_correctly(launches, monkeypatch):
    """The GPU launch code (autotuner call, grid from the chosen config, key names), run under the
    interpreter with small configs and a wall-clock benchmark in place of the CUDA one."""
    import triton

    for tuner in (attn._prefill_tuned, attn._prefill_tuned_fp32, attn._decode_split_tuned):
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
    monkeypatch.setattr(attn, "_prefill_tuned", tuned(attn._prefill_kernel, attn._prefill_tuned, small_prefill))
    monkeypatch.setattr(attn, "_prefill_tuned_fp32", tuned(attn._prefill_kernel, attn._prefill_tuned_fp32, small_prefill[1:]))
    monkeypatch.setattr(attn, "_decode_split_tuned", tuned(attn._decode_split_kernel, attn._decode_split_tuned, small_decode))
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    monkeypatch.setattr(attn, "triton_usable_on", lambda device: True)

    for dtype in (F16, F32):  # not bf16: without UPCAST the interpreter's bf16 dot is wrong
        B, T, H, D, S = 2, 37, 2, 64, 60
        q, k, v = fused_qkv(B, T, H, D, dtype)
        row_start = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
        kc = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)
        vc = nan_like(kc)
        out = attn.prefill_attention(q, k, v, kc, vc, row_start)
        assert_close(out, prefill_reference(q, k, v, S, row_start), dtype, "autotuned prefill")
        qd, kd, vd = fused_qkv(B, 1, H, D, dtype)
        ws = attn.decode_workspace(B, H, D, S, DEVICE, n_split=3)
        pos = torch.tensor([T], dtype=torch.int32, device=DEVICE)
        out_d = attn.decode_attention(qd, kd, vd, kc, vc, pos, row_start, ws)
        kr, vr = kc.double().nan_to_num(0.0), vc.double().nan_to_num(0.0)
        kr[:, :, T] = 0.0
        ref = reference.attention(qd.double(), kd.double(), vd.double(), kr, vr, T, row_start)
        assert_close(out_d, ref, dtype, "autotuned decode")
    assert launches["_prefill_kernel"] >= 4 and launches["_decode_split_kernel"] >= 4
    assert launches["_decode_combine_kernel"] == 2
