"""Tests of the Triton attention prefill (kernels/attention_prefill.py) against fastgpt.reference.attention.

The oracle runs in float64 on copies of the inputs. Every launch writes into outputs and caches
poisoned with NaN, so an element a kernel forgets to write fails the test, and a spy on the
kernel's ``run`` proves the Triton path ran (there is no fallback to hide behind). Without a GPU
the kernel runs in the Triton interpreter on a small, representative subset (several key blocks,
left padding, all-pad rows, every autotune config at a tiny size); the full shape matrix is marked
``cuda``. Tolerances: tests/attention_helpers.py.

Grouped-query heads (``H_kv < H``: 9/3, 4/1, 8/2, 14/2, 12/2) and rotary embedding (random
positive frequencies around Hugging Face's defaults) are checked the same way, the cache holding
the rotated keys; the group rarely divides the tile, so query slots straddle tile edges. The
sm_90 compile check covers a representative subset by default and every (dtype, head_dim,
group, rope) with ``FASTGPT_COMPILE_MATRIX=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastgpt.kernels import attention_prefill as AP
from tests.attention_helpers import (
    ROPE_BAD,
    BF16, DEVICE, DTYPES, F16, F32, assert_close, check_compiled, cuda_case, fused_qkv, gqa_qkv, launches,
    make_row_start, nan_like, prefill_reference, prefill_reference_and_cache, rope_frequencies,
)
from tests.kernel_helpers import run_compile_workers

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

    result = AP.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out)

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
    out = AP.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), row_start)
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
    AP.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), row_start, out=out)
    assert_close(out, prefill_reference(q, k, v, 32, row_start), F32, "prefill into a view")
    assert flat[:, :, H * D :].isnan().all()


def test_prefill_negative_row_start_means_no_padding():
    B, T, H, D = 2, 10, 1, 64
    q, k, v = fused_qkv(B, T, H, D, F32)
    k_cache = torch.zeros(B, H, T, D, dtype=F32, device=DEVICE)
    out = AP.prefill_attention(q, k, v, k_cache, torch.zeros_like(k_cache), torch.tensor([-3, 0], dtype=torch.int32, device=DEVICE))
    ref = prefill_reference(q, k, v, T, torch.zeros(B, dtype=torch.int32, device=DEVICE))
    assert_close(out, ref, F32, "negative row_start")


# --------------------------------------------------------------------------------------------
# Grouped-query heads and rotary embedding
# --------------------------------------------------------------------------------------------
def _run_prefill(q, k, v, S_max, row_start, rope, config=None):
    """Launch on NaN-poisoned output and caches; returns (out, k_cache, v_cache)."""
    B, T, H, D = q.shape
    k_cache = torch.full((B, k.shape[2], S_max, D), float("nan"), dtype=q.dtype, device=DEVICE)
    v_cache = nan_like(k_cache)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    if config is None:
        assert AP.prefill_attention(q, k, v, k_cache, v_cache, row_start, out=out, rope=rope) is out
    else:
        AP._launch_prefill(q, k, v, k_cache, v_cache, row_start, out, config=config, rope=rope)
    return out, k_cache, v_cache


def _check_prefill(out, k_cache, v_cache, q, k, v, row_start, rope, what):
    T, dtype = q.shape[1], q.dtype
    S_max = k_cache.shape[2]
    ref, k_ref, v_ref = prefill_reference_and_cache(q, k, v, S_max, row_start, rope)
    assert_close(out, ref, dtype, f"{what} output")
    # Slots [0, T) hold the (rotated) keys and the values; later slots are untouched. The kernel
    # rounds the float32 rotation once, so rotated keys match the float64 ones to the dtype's
    # tolerance; without rope the copy is exact.
    if rope is None:
        assert torch.equal(k_cache[:, :, :T], k.transpose(1, 2)), f"{what}: k cache"
    else:
        assert_close(k_cache[:, :, :T], k_ref[:, :, :T], dtype, f"{what} rotated k cache")
    assert torch.equal(v_cache[:, :, :T], v.transpose(1, 2)), f"{what}: v cache"
    assert k_cache[:, :, T:].isnan().all() and v_cache[:, :, T:].isnan().all(), f"{what}: slots >= T written"


# (B, T, H, H_kv, D, pad, rope, dtype). The interpreter's tile is 16 flat (query slot, head) rows
# by 16 keys: T * H / H_kv spans several tiles whose query slots straddle tile edges (9/3, 14/2)
# and several key blocks; no T is a multiple of 16.
GQA_CPU = [
    (2, 21, 9, 3, 64, True, True, F32),  # SmolLM2's grouping
    (2, 21, 9, 3, 64, True, False, F16),
    (3, 19, 4, 1, 128, True, True, F32),  # multi-query
    (1, 13, 4, 1, 64, False, True, BF16),
    (2, 17, 8, 2, 64, True, True, F16),
    (2, 11, 14, 2, 64, True, True, F32),  # Qwen2.5-0.5B's grouping
    (1, 37, 2, 2, 128, False, True, F32),  # no grouping, rope on (GPT-2-shaped heads)
    (2, 9, 12, 2, 128, True, False, BF16),
]
GQA_CUDA = [
    (B, T, H, H_kv, D, B > 1, rope, dtype)
    for (H, H_kv, D) in ((9, 3, 64), (14, 2, 64), (12, 2, 128), (32, 8, 64), (24, 8, 128), (32, 8, 128), (8, 1, 128))
    for (B, T) in ((1, 1), (3, 77), (2, 1000))
    for rope in (False, True)
    for dtype in DTYPES
]


@pytest.mark.parametrize(
    "B,T,H,H_kv,D,pad,rope,dtype",
    [pytest.param(*c) for c in GQA_CPU] + [cuda_case(*c) for c in GQA_CUDA],
    ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None,
)
def test_grouped_prefill_with_rope_matches_reference(launches, B, T, H, H_kv, D, pad, rope, dtype):
    q, k, v = gqa_qkv(B, T, H, H_kv, D, dtype)
    row_start = make_row_start(B, T, pad)
    inv_freq = rope_frequencies(D) if rope else None
    out, k_cache, v_cache = _run_prefill(q, k, v, T + 3, row_start, inv_freq)
    assert launches["_prefill_kernel"] == 1
    _check_prefill(out, k_cache, v_cache, q, k, v, row_start, inv_freq, f"H {H} / H_kv {H_kv}, rope {rope}")


def test_rope_positions_count_from_the_raw_row_start(launches):
    """A negative row_start means no padding for the masks, but the rotary positions are
    ``slot - row_start`` (clamped >= 0) exactly as :func:`reference.rope_positions` says."""
    B, T, H, H_kv, D = 3, 10, 6, 2, 64
    q, k, v = gqa_qkv(B, T, H, H_kv, D, F32)
    row_start = torch.tensor([-3, 0, 4], dtype=torch.int32, device=DEVICE)
    inv_freq = rope_frequencies(D)
    out, k_cache, v_cache = _run_prefill(q, k, v, T, row_start, inv_freq)
    _check_prefill(out, k_cache, v_cache, q, k, v, row_start, inv_freq, "negative row_start")


# --------------------------------------------------------------------------------------------
# Every autotune config, pinned (the interpreter runs the GPU tile sizes too, on small shapes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,config",
    [(F16, c) for c in AP.PREFILL_CONFIGS] + [(F32, c) for c in AP.PREFILL_CONFIGS_FP32],
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
    AP._launch_prefill(q, k, v, k_cache, v_cache, row_start, out, config=config)
    assert launches["_prefill_kernel"] == 1
    assert_close(out, prefill_reference(q, k, v, T + 3, row_start), dtype, f"prefill {config}")
    assert torch.equal(k_cache[:, :, :T], k.transpose(1, 2)) and k_cache[:, :, T:].isnan().all()


@pytest.mark.parametrize(
    "dtype,group,config",
    [(F16, 3, c) for c in AP.PREFILL_CONFIGS_GQA] + [(F32, 7, c) for c in AP.PREFILL_CONFIGS_FP32_GQA],
    ids=lambda x: str(x) if not isinstance(x, dict) else "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**x),
)
def test_grouped_rope_prefill_every_config(launches, dtype, group, config):
    # Two and a bit tiles of flat (query slot, head) rows; the group does not divide BLOCK_M, so
    # query slots straddle the tile edges. Rows: no padding, row_start in the first key block,
    # row_start past the first tile's queries, all padding.
    B, H_kv, D = 4, 1, 64
    T = 2 * config["BLOCK_M"] // group + 3
    q, k, v = gqa_qkv(B, T, group * H_kv, H_kv, D, dtype)
    row_start = torch.tensor([0, 3, config["BLOCK_M"] // group + 2, T], dtype=torch.int32, device=DEVICE)
    inv_freq = rope_frequencies(D)
    out, k_cache, v_cache = _run_prefill(q, k, v, T + 2, row_start, inv_freq, config=config)
    assert launches["_prefill_kernel"] == 1
    _check_prefill(out, k_cache, v_cache, q, k, v, row_start, inv_freq, f"prefill {config}")


def test_configs_follow_dtype_group_and_rope():
    assert AP.prefill_configs(F16, 1, False) is AP.PREFILL_CONFIGS  # GPT-2: unchanged
    assert AP.prefill_configs(BF16, 4, False) is AP.PREFILL_CONFIGS_GQA
    assert AP.prefill_configs(F16, 1, True) is AP.PREFILL_CONFIGS_GQA
    assert AP.prefill_configs(F32, 8, True) is AP.PREFILL_CONFIGS_FP32_GQA
    assert AP.prefill_configs(F32, 1, False) is AP.PREFILL_CONFIGS_FP32


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, raised before any kernel runs
# --------------------------------------------------------------------------------------------
def _valid_prefill_args(dtype=F16):
    B, T, H, D, S = 2, 5, 3, 64, 8
    q, k, v = fused_qkv(B, T, H, D, dtype)
    kc = torch.zeros(B, H, S, D, dtype=dtype, device=DEVICE)
    return dict(q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone(), row_start=torch.zeros(B, dtype=torch.int32, device=DEVICE))


def _head_dim_32(a):
    q, k, v = fused_qkv(2, 5, 3, 32, F16)
    kc = torch.zeros(2, 3, 8, 32, dtype=F16, device=DEVICE)
    a.update(q=q, k=k, v=v, k_cache=kc, v_cache=kc.clone())


def _grouped_cache_mismatch(a):
    q, k, v = gqa_qkv(2, 5, 6, 2, 64, F16)  # 3 query heads per K/V head
    a.update(q=q, k=k, v=v)  # the caches keep q's 3 heads instead of k's 2


PREFILL_BAD = [
    ("q not a tensor", lambda a: a.update(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("q float64", lambda a: a.update(q=a["q"].double()), TypeError, "q must have dtype"),
    ("q 3-D", lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("q last dim strided", lambda a: a.update(q=a["q"].transpose(2, 3)), ValueError, "q must be contiguous in its last"),
    ("head_dim 32", _head_dim_32, ValueError, "head_dim"),
    ("k dtype differs", lambda a: a.update(k=a["k"].float()), TypeError, "k must have dtype"),
    ("v shape differs", lambda a: a.update(v=a["v"][:, :4]), ValueError, "v must have k's shape"),
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
    ("k heads do not divide q's", lambda a: a.update(k=a["k"][:, :, :2], v=a["v"][:, :, :2]), ValueError, "H_kv dividing q's 3 heads"),
    ("v fewer heads than k", lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "v must have k's shape"),
    ("cache heads differ from k's", _grouped_cache_mismatch, ValueError, "k_cache must be"),
] + ROPE_BAD


@pytest.mark.parametrize("name,mutate,exc,match", PREFILL_BAD, ids=[c[0] for c in PREFILL_BAD])
def test_prefill_rejects_bad_inputs(launches, name, mutate, exc, match):
    a = _valid_prefill_args()
    mutate(a)
    kc_before = a["k_cache"].clone()
    with pytest.raises(exc, match=match):
        AP.prefill_attention(**a)
    assert sum(launches.values()) == 0
    assert torch.equal(a["k_cache"], kc_before)


@pytest.mark.cuda
def test_cpu_tensors_are_rejected_on_a_gpu_machine(launches):
    a = _valid_prefill_args()
    a = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in a.items()}
    with pytest.raises(ValueError, match="q is on cpu"):
        AP.prefill_attention(**a)
    assert sum(launches.values()) == 0


# --------------------------------------------------------------------------------------------
# sm_90 compilation
# --------------------------------------------------------------------------------------------
def _compile_specs(dtypes, head_dims, groups, ropes) -> list:
    """One spec per (dtype, head_dim, group, rope) and config of :func:`AP.prefill_configs`."""
    names = {F16: "fp16", BF16: "bf16", F32: "fp32"}
    return [
        ("prefill", names[dtype], head_dim, dict(c, GROUP=group, ROPE=rope))
        for dtype in dtypes
        for head_dim in head_dims
        for group in groups
        for rope in ropes
        for c in AP.prefill_configs(dtype, group, rope)
    ]


def test_every_prefill_config_compiles_for_sm90_without_spills():
    """Every config at head_dim 128, where registers run out first (64 only shrinks the tiles), at
    bfloat16 and float32, for GPT-2's case and the grouped / rotary kernels whose extra registers
    decided their configs (group 7: the odd one that spilled first). The full matrix is below."""
    specs = _compile_specs([BF16], [128], [1], [False])
    specs += _compile_specs([BF16], [128], [7], [True]) + _compile_specs([BF16], [128], [8], [False])
    specs += _compile_specs([F32], [128], [1], [False]) + _compile_specs([F32], [128], [7], [True])
    check_compiled(run_compile_workers("attention_helpers", specs))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTGPT_COMPILE_MATRIX") != "1",
    reason="the full sm_90 compile matrix takes 3-5 minutes on 2 cores: set FASTGPT_COMPILE_MATRIX=1",
)
def test_every_prefill_variant_compiles_for_sm90_without_spills():
    """The whole matrix (88 compiles): float16/bfloat16/float32, head_dim 64 and 128, every group
    of the supported models (H / H_kv in {1, 2, 3, 4, 6, 7, 8}), rope on and off. Run it after
    touching the kernel or its configs: ptxas's register allocation is close to the limit and
    changes with the group's divisor constants, so one group passing says little about another."""
    specs = _compile_specs([F16, BF16, F32], [64, 128], [1, 2, 3, 4, 6, 7, 8], [False, True])
    check_compiled(run_compile_workers("attention_helpers", specs))


def test_autotuner_configs_are_the_exported_lists():
    def listed(tuner):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tuner.configs]

    assert listed(AP._prefill_tuned) == AP.PREFILL_CONFIGS
    assert listed(AP._prefill_tuned_gqa) == AP.PREFILL_CONFIGS_GQA
    assert listed(AP._prefill_tuned_fp32) == AP.PREFILL_CONFIGS_FP32
    assert listed(AP._prefill_tuned_fp32_gqa) == AP.PREFILL_CONFIGS_FP32_GQA
    configs = AP.PREFILL_CONFIGS + AP.PREFILL_CONFIGS_GQA + AP.PREFILL_CONFIGS_FP32 + AP.PREFILL_CONFIGS_FP32_GQA
    assert all(c["BLOCK_M"] % c["BLOCK_N"] == 0 for c in configs)
