"""Tests of the Triton flash-decoding attention (kernels/attention_decode.py) against fastgpt.reference.attention.

The oracle runs in float64 on copies of the inputs. Every launch writes into outputs, caches and
split workspaces poisoned with NaN, so an element a kernel forgets to write fails the test, and a
spy on the kernels' ``run`` proves the Triton path ran. Without a GPU the kernels run in the
Triton interpreter on a small subset (several decode splits, left padding, every autotune config
at a tiny size); the full shape matrix, CUDA graphs and the autotuned path on a GPU are marked
``cuda``. Prefill then decode steps (the model's order) are tested here too. Tolerances:
tests/attention_helpers.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastgpt import reference
from fastgpt.kv_cache import KVCache
from fastgpt.kernels import attention_common as AC
from fastgpt.kernels import attention_decode as AD
from fastgpt.kernels import attention_prefill as AP
from tests.attention_helpers import (
    BF16, DEVICE, DTYPES, F16, F32, assert_close, check_compiled, cuda_case, fused_qkv, launches,
    make_row_start, nan_like, prefill_reference,
)
from tests.kernel_helpers import run_compile_workers

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
    workspace = AD.decode_workspace(B, H, D, S_max, DEVICE, n_split=n_split)
    for t in workspace.values():
        t.fill_(float("nan"))
    out = torch.full((B, 1, H, D), float("nan"), dtype=dtype, device=DEVICE)
    cache_pos = torch.tensor([pos], dtype=torch.int32, device=DEVICE)

    if config is None:
        result = AD.decode_attention(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out=out)
        assert result is out
    else:
        AD._launch_decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out, config=config)

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
# Split heuristic and workspace
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch,n_head,max_len",
    [(1, 12, 128), (1, 12, 1024), (1, 12, 8192), (8, 25, 8192), (64, 12, 8192), (256, 25, 1024), (1, 1, 1), (3, 5, 1000)],
)
def test_decode_num_splits_depends_on_shape_only_and_covers_the_cache(batch, n_head, max_len):
    n_split = AD.decode_num_splits(batch, n_head, max_len)
    chunk = AD.decode_chunk(max_len, n_split)
    assert n_split == AD.decode_num_splits(batch, n_head, max_len) >= 1
    assert chunk & (chunk - 1) == 0, "chunk is a power of two"
    assert n_split * chunk >= max_len > (n_split - 1) * chunk, "every split owns slots, all slots are owned"
    assert chunk >= min(AD.DECODE_MIN_CHUNK, max(16, max_len)) or n_split == 1
    # Enough programs to fill the GPU unless chunks are already at their minimum size.
    assert batch * n_head * n_split >= AD.DECODE_TARGET_PROGRAMS or chunk <= AD.DECODE_MIN_CHUNK or n_split == 1
    ws = AD.decode_workspace(batch, n_head, 64, max_len, "cpu")
    assert ws["attn_o"].shape == (batch, n_head, n_split, 64)
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
]


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


@pytest.mark.cuda
def test_decode_refuses_to_autotune_during_graph_capture(launches, monkeypatch):
    # Simulate capture (a real aborted capture could leave the stream unusable for later tests).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a = _valid_decode_args()
    a["workspace"] = AD.decode_workspace(2, 3, 64, 8, DEVICE, n_split=5)  # a key never tuned before
    with pytest.raises(RuntimeError, match="warmup_decode"):
        AD.decode_attention(**a)
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


# --------------------------------------------------------------------------------------------
# sm_90 compile check of every (kernel, config) the autotuner may pick (runs on the CPU)
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# sm_90 compilation
# --------------------------------------------------------------------------------------------
def test_every_decode_config_compiles_for_sm90_without_spills():
    """Split configs at float32/128 and float16/64 (those the autotuner tries there), the combine
    kernel at float32/128 and bfloat16/64."""
    specs = [("decode", dt, d, c) for dt, d in (("fp32", 128), ("fp16", 64)) for c in AD.decode_configs_for(d)]
    assert {json.dumps(c) for _, _, _, c in specs} == {json.dumps(c) for c in AD.DECODE_CONFIGS}  # each one somewhere
    specs += [("combine", dt, d, AD.COMBINE_CONFIG) for dt, d in (("fp32", 128), ("bf16", 64))]
    check_compiled(run_compile_workers("attention_helpers", specs))


def test_autotuner_configs_are_the_exported_lists():
    tuner = AD._decode_split_tuned
    listed = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tuner.configs]
    assert listed == AD.DECODE_CONFIGS
    for head_dim in (64, 128):  # the prune the tuner applies is decode_configs_for
        kept = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=head_dim)
        assert [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept] == AD.decode_configs_for(head_dim)
    assert [c["BLOCK_N"] for c in AD.decode_configs_for(128)] == [32, 64]  # 128 x 128 spills


# --------------------------------------------------------------------------------------------
# The autotuned launch path, exercised on the CPU with the interpreted kernels
# --------------------------------------------------------------------------------------------
def test_autotuned_launch_path_passes_keys_and_meta_correctly(launches, monkeypatch):
    """The GPU launch code (autotuner call, grid from the chosen config, key names), run under the
    interpreter with small configs and a wall-clock benchmark in place of the CUDA one."""
    import triton

    for tuner in (AP._prefill_tuned, AP._prefill_tuned_fp32, AD._decode_split_tuned):
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
