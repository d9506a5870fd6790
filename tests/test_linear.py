"""The fused GEMV (kernels/linear.py) -- LayerNorm / RMSNorm prologue, GELU / SwiGLU (silu_glu)
and residual epilogues -- its per-shape plan, and the model wired through it.

Kernel results are compared with :func:`fastgpt.reference.linear` evaluated in float64 on fresh
random inputs, outputs (and split-K partials) poisoned with NaN before each launch. On the CPU the
kernels run in the Triton interpreter on small shapes; ``cuda`` tests run GPT-2's shapes, every
candidate config, the measured plan, CUDA-graph replay and the kernel count of a decode step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import fastgpt.backend as backend
from fastgpt import GPT, GPTConfig, kernels_report, reference, reset_kernels_report
from fastgpt.kernels import attention_decode as AD
from fastgpt.kernels import linear as KL
from fastgpt.kernels.utils import launch_record
from tests.kernel_helpers import LaunchCounter, run_compile_workers, spill_bytes
from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: max |out - ref| allowed, relative to max |ref|. fp16/bf16: the output's rounding (2^-11, 2^-8
#: relative; the interpreter truncates to bf16 instead of rounding) plus the LayerNorm output
#: rounded to the dtype before the product; fp32: accumulation-order noise only.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class _GemvLaunches:
    """Launches of both GEMV kernels (the K-loop / split-K one and the whole-row one)."""

    def __init__(self, monkeypatch):
        self.k_loop, self.row = LaunchCounter(KL._gemv_kernel), LaunchCounter(KL._gemv_row_kernel)
        monkeypatch.setattr(KL, "_gemv_kernel", self.k_loop)
        monkeypatch.setattr(KL, "_gemv_row_kernel", self.row)

    @property
    def launches(self) -> int:
        return self.k_loop.launches + self.row.launches


@pytest.fixture
def gemv_launches(monkeypatch):
    return _GemvLaunches(monkeypatch)


def make_inputs(M, N, K, dtype, *, bias=True, residual=True, ln=True, lead=None, device=DEVICE, seed=None, norm="layernorm", glu=False):
    """Random operands of a linear op; ``lead`` replaces ``(M,)`` as x's leading shape.

    ``norm="rmsnorm"``: no ``ln_bias``. ``glu``: the residual has the silu_glu output's N/2 columns.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    lead = (M,) if lead is None else lead

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    return dict(
        x=rnd(*lead, K, scale=2.0, shift=0.5),  # a non-zero mean, as residual streams have
        weight=rnd(N, K, scale=K**-0.5),
        bias=rnd(N, scale=0.5) if bias else None,
        residual=rnd(*lead, N // 2 if glu else N) if residual else None,
        ln_weight=rnd(K, scale=0.2, shift=1.0) if ln else None,
        ln_bias=rnd(K, scale=0.2) if ln and norm == "layernorm" else None,
    )


def reference64(inp, activation, ln_eps=1e-5, norm="layernorm"):
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    return reference.linear(
        d["x"], d["weight"], d["bias"], activation=activation, residual=d["residual"],
        ln_weight=d["ln_weight"], ln_bias=d["ln_bias"], ln_eps=ln_eps, norm=norm,
    )  # fmt: skip


def assert_close(got, ref, dtype, what=""):
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten outputs?)"
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-3), f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}"


def poisoned(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_gemv(inp, activation, config=None, out=None, **kwargs):
    N = KL.output_width(inp["weight"].shape[0], activation)
    if out is None:
        out = poisoned((*inp["x"].shape[:-1], N), inp["x"].dtype, inp["x"].device)
    return KL.linear(**inp, activation=activation, out=out, config=config, **kwargs)


# --------------------------------------------------------------------------------------------
# the kernel (interpreter on the CPU; the same tests run compiled on a GPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_features_match_float64_reference(dtype, M, gemv_launches):
    inp = make_inputs(M, 50, 77, dtype)
    out = run_gemv(inp, "gelu_tanh")
    assert gemv_launches.launches == 1
    assert_close(out, reference64(inp, "gelu_tanh"), dtype, f"{dtype} M={M}")


EPILOGUES = {
    "plain": dict(bias=False, residual=False, ln=False, activation=None),
    "bias": dict(bias=True, residual=False, ln=False, activation=None),
    "bias+gelu_tanh": dict(bias=True, residual=False, ln=False, activation="gelu_tanh"),
    "bias+gelu_erf": dict(bias=True, residual=False, ln=False, activation="gelu"),
    "bias+residual": dict(bias=True, residual=True, ln=False, activation=None),
    "ln+bias": dict(bias=True, residual=False, ln=True, activation=None),
    "ln+bias+gelu_tanh": dict(bias=True, residual=False, ln=True, activation="gelu_tanh"),
    "ln_only": dict(bias=False, residual=False, ln=True, activation=None),  # ln_f + LM head
}


#: On a GPU every combination is a compile (~1 s): there the model's combinations are covered by
#: test_gpt2_shapes_fp16_cuda, and this test keeps the two the model does not use.
_EPILOGUE_CASES = (
    [(e, d, m) for e in EPILOGUES for d in (torch.float32, torch.float16) for m in (1, 7)]
    if DEVICE == "cpu"
    else [(e, torch.float16, m) for e in ("plain", "bias+gelu_erf") for m in (1, 7)]
)


@pytest.mark.parametrize("epilogue, dtype, M", _EPILOGUE_CASES, ids=str)
def test_each_epilogue(epilogue, dtype, M, gemv_launches):
    spec = dict(EPILOGUES[epilogue])
    activation = spec.pop("activation")
    inp = make_inputs(M, 33, 70, dtype, **spec)
    out = run_gemv(inp, activation)
    assert gemv_launches.launches == 1
    assert_close(out, reference64(inp, activation), dtype, epilogue)


def test_m1_layernorm_statistics_in_chunks(monkeypatch):
    """M == 1 rows wider than LN_ROW_MAX take the chunked two-pass statistics (as M > 1 does)."""
    monkeypatch.setattr(KL, "LN_ROW_MAX", 32)
    assert KL._ln_row(True, 1, 77) == 0 and KL._ln_row(True, 1, 20) == 32
    inp = make_inputs(1, 30, 77, torch.float32)
    out = run_gemv(inp, "gelu_tanh", KL.GemvConfig(16, 32, 4, 1, 1))
    assert_close(out, reference64(inp, "gelu_tanh"), torch.float32, "chunked LN statistics")


@pytest.mark.parametrize("M, K, split", [(1, 150, 3), (5, 200, 4)])
def test_split_k_sums_partials_and_resets_counters(M, K, split, gemv_launches):
    N = 40
    cfg = KL.GemvConfig(16, 64, 4, 1, split)  # K / 64 chunks -> `split` splits of one chunk
    n_split, k_per_split = KL._effective_split(K, cfg.block_k, cfg.split_k)
    assert n_split == split and n_split * k_per_split >= K
    partials, counters = KL.workspace_for(M, N, cfg, K, DEVICE)
    partials.fill_(float("nan"))  # every partial read must have been written by this launch
    assert int(counters.abs().sum()) == 0
    inp = make_inputs(M, N, K, torch.float32)
    first = run_gemv(inp, "gelu_tanh", cfg)
    assert int(counters.abs().sum()) == 0, "the finishing split must reset its tile counter"
    assert_close(first, reference64(inp, "gelu_tanh"), torch.float32, "split-K")
    # The same workspace again: a second launch (as a graph replay would) gives the same bits.
    inp2 = dict(inp, x=inp["x"] * -0.5)
    second = run_gemv(inp2, "gelu_tanh", cfg)
    assert_close(second, reference64(inp2, "gelu_tanh"), torch.float32, "split-K, second launch")
    again = run_gemv(inp, "gelu_tanh", cfg)
    assert torch.equal(again, first), "split-K must be deterministic (partials summed in split order)"
    assert gemv_launches.launches == 3


class _DroppedSplits:
    """Stands in for the GEMV kernel: launches only the first ``n_split - drop`` splits of each tile,
    as a launch whose last programs never arrived (killed, or racing another launch) leaves it."""

    def __init__(self, kernel, drop):
        self.kernel, self.drop = kernel, drop

    def __getitem__(self, grid):
        n_tiles, n_split = grid
        return self.kernel[(n_tiles, n_split - self.drop)]


@pytest.mark.parametrize("interrupted", [1, 2])
def test_split_k_recovers_after_incomplete_launches(interrupted, monkeypatch):
    """After ``interrupted`` launches in a row where some splits never arrived, the split-K
    counters heal: at most ``interrupted - 1`` later launches are wrong, then every launch is exact
    and the counters are back at 0 (the old protocol stayed wrong forever)."""
    M, N, K, split = 1, 40, 256, 4
    cfg = KL.GemvConfig(16, 64, 4, 1, split)
    assert KL._effective_split(K, cfg.block_k, cfg.split_k)[0] == split
    inp = make_inputs(M, N, K, torch.float32)
    run_gemv(inp, None, cfg)  # the workspace exists and the counters are clean
    _, counters = KL.workspace_for(M, N, cfg, K, DEVICE)
    kernel = KL._gemv_kernel
    monkeypatch.setattr(KL, "_gemv_kernel", _DroppedSplits(kernel, drop=1))
    for _ in range(interrupted):
        run_gemv(inp, None, cfg)
    assert int(counters.abs().sum()) > 0  # the incomplete launches left stale counts
    monkeypatch.setattr(KL, "_gemv_kernel", kernel)
    results = []
    for i in range(interrupted + 3):
        x = dict(inp, x=inp["x"] * (i + 1))  # new inputs: a stale output cannot pass for a new one
        out = run_gemv(x, None, cfg)
        results.append(bool(torch.allclose(out.double(), reference64(x, None), rtol=1e-4, atol=1e-4)))
    assert results.count(False) <= interrupted - 1, results
    assert all(results[interrupted - 1:]), results  # exact from then on
    assert int(counters.abs().sum()) == 0


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU: test_every_candidate_config_cuda (GPT-2 shapes)")
@pytest.mark.parametrize(
    "M, tile", [(1, t) for t in KL.M1_TILES] + [(3, t) for t in KL.DOT_TILES], ids=lambda v: str(v)
)
def test_every_candidate_tile(M, tile):
    """Each tile the measurement may pick, with and without split-K (K spans several chunks)."""
    bn, bk, warps, stages = tile
    N, K = 2 * bn + 3, 2 * bk + 5  # a partial last column tile and K chunk
    inp = make_inputs(M, N, K, torch.float32, seed=bn * bk)
    for split in (1, 3):
        out = run_gemv(inp, "gelu_tanh", KL.GemvConfig(bn, bk, warps, stages, split))
        assert_close(out, reference64(inp, "gelu_tanh"), torch.float32, f"tile {tile} split {split}")


# --------------------------------------------------------------------------------------------
# the attention combine in the out-projection's prologue
# --------------------------------------------------------------------------------------------
def attention_step(B, H, D, S_max, pos, n_split, dtype, pad, seed):
    """One decode attention step left as partials (``combine=False``), on a random cache.

    Returns ``(partials, ref_attn)``: ``ref_attn`` (B, 1, H*D) float64 is the reference attention
    output rounded to ``dtype`` (what a stored attention output holds) -- the out-projection's x.
    The partials workspace is poisoned with NaN first: splits that must not be read stay NaN.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)  # noqa: E731
    k_cache, v_cache = rnd(B, H, S_max, D), rnd(B, H, S_max, D)
    qkv = rnd(B, 1, 3 * H * D)
    q, k, v = qkv.view(B, 1, 3, H, D).unbind(2)  # (B, 1, H, D) strided views, as in the model
    # Row 1 (when present) is all padding (an all-pad row gives 0), row 2 starts mid-history.
    row_start = torch.tensor([0, pos + 1, pos // 2][:B] + [0] * max(0, B - 3), dtype=torch.int32, device=DEVICE)
    if not pad:
        row_start.zero_()
    kr, vr = k_cache.double().clone(), v_cache.double().clone()
    workspace = AD.decode_workspace(B, H, D, S_max, DEVICE, n_split=n_split)
    for t in workspace.values():
        t.fill_(float("nan"))
    cache_pos = torch.tensor([pos], dtype=torch.int32, device=DEVICE)
    partials = AD.decode_attention(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, combine=False)
    ref = reference.attention(q.double(), k.double(), v.double(), kr, vr, pos, row_start)  # (B, 1, H, D)
    return partials, ref.to(dtype).double().flatten(2)  # (B, 1, H*D)


def reference_out_projection(ref_attn, inp):
    """float64 ``residual + ref_attn @ W^T + bias``."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    return reference.linear(ref_attn, d["weight"], d["bias"], residual=d["residual"])


# (B, H, S_max, pos, n_split, pad, config): M = 1 (element-wise path) and M > 1 (tl.dot), splits 1 .. 9,
# the position on a chunk boundary, splits after the position (stale partials never read), split-K.
ATTN_COMBINE_CASES = [
    (1, 2, 40, 39, 1, False, None),
    (1, 2, 100, 64, 7, False, None),
    (1, 2, 150, 20, 9, False, KL.GemvConfig(16, 64, 4, 1, 2)),  # split-K: each split combines its K
    (3, 2, 70, 55, 5, True, None),
    (2, 2, 50, 31, 2, True, KL.GemvConfig(16, 64, 4, 1, 2)),
]


@pytest.mark.parametrize("B, H, S_max, pos, n_split, pad, config", ATTN_COMBINE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_projection_combines_attention_partials(B, H, S_max, pos, n_split, pad, config, dtype, gemv_launches):
    D = 64
    partials, ref_attn = attention_step(B, H, D, S_max, pos, n_split, dtype, pad, seed=pos + n_split)
    assert partials.n_split == n_split
    inp = make_inputs(B, 40, H * D, dtype, ln=False, lead=(B, 1), seed=n_split)
    del inp["x"], inp["ln_weight"], inp["ln_bias"]
    out = poisoned((B, 1, 40), dtype)
    got = KL.linear(None, **inp, out=out, config=config, attn_partials=partials)
    assert got is out and gemv_launches.launches == 1
    record = launch_record()
    assert record["linear"]["attn_combine"] is True and record["attention_decode"]["launches"] == 1
    assert_close(out, reference_out_projection(ref_attn, inp), dtype, f"B={B} n_split={n_split} config={config}")


def test_attention_partials_out_of_range_position_gives_nan():
    partials, _ = attention_step(1, 2, 64, 40, 20, 3, torch.float32, False, seed=0)
    partials.cache_pos.fill_(40)  # S_max: out of range (nothing valid; the combine says so loudly)
    inp = make_inputs(1, 24, 128, torch.float32, ln=False, residual=False, lead=(1, 1))
    out = KL.linear(None, inp["weight"], inp["bias"], attn_partials=partials)
    assert out.isnan().all()


def test_attention_partials_bad_arguments_raise(gemv_launches):
    partials, _ = attention_step(1, 2, 64, 40, 20, 3, torch.float32, False, seed=0)
    inp = make_inputs(1, 24, 128, torch.float32, lead=(1, 1))
    with pytest.raises(ValueError, match="pass x or attn_partials, not both"):
        KL.linear(inp["x"], inp["weight"], attn_partials=partials)
    with pytest.raises(ValueError, match="no LayerNorm"):
        KL.linear(None, inp["weight"], ln_weight=inp["ln_weight"], ln_bias=inp["ln_bias"], attn_partials=partials)
    with pytest.raises(TypeError, match="attn_partials must be the AttentionPartials"):
        KL.linear(None, inp["weight"], attn_partials=partials.o)
    with pytest.raises(ValueError, match=r"weight must be \(N, K=128\)"):
        KL.linear(None, inp["weight"][:, :100], attn_partials=partials)
    assert gemv_launches.launches == 0


# --------------------------------------------------------------------------------------------
# the whole-row kernel (M == 1, K <= ROW_K_MAX) and the persistent LM head
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N, K, epilogue, persistent",
    [
        (50, 77, "ln+bias+gelu_tanh", False),  # odd K: one masked 128-wide row, no K loop
        (29, 768, "bias+residual", False),  # GPT-2's width
        (15, 1600, "ln+bias", False),  # GPT-2 XL's width: one 2048-wide row, no 256-wide tail step
        (5003, 77, "ln_only", True),  # an LM head: persistent, statistics once per program
        (301, 130, "bias+gelu_erf", True),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_whole_row_kernel(N, K, epilogue, persistent, dtype, gemv_launches):
    spec = dict(EPILOGUES[epilogue])
    activation = spec.pop("activation")
    inp = make_inputs(1, N, K, dtype, seed=N + K, **spec)
    config = KL.default_config(1, N, K, DEVICE)
    assert config == KL.row_config(K) and KL.uses_row_kernel(1, K, config)
    workspaces = dict(KL._WORKSPACES)
    out = run_gemv(inp, activation)
    assert (gemv_launches.row.launches, gemv_launches.k_loop.launches) == (1, 0)
    record = launch_record()["linear"]
    assert record["kernel"] == "row" and record["n_split"] == 1 and record["persistent"] == persistent
    assert KL._WORKSPACES == workspaces, "one K chunk per program: no split-K workspace"
    assert_close(out, reference64(inp, activation), dtype, f"N={N} K={K} {epilogue}")


def test_persistent_grid_and_the_k_loop_beyond_row_k_max():
    n_sm = KL._num_sms(torch.device(DEVICE))
    cfg = KL.row_config(768)
    assert (cfg.block_n, cfg.block_k, cfg.split_k) == (4, 1024, 1)
    assert KL.row_config(1600).block_k == 2048 and KL.row_config(1600).block_n == 2
    programs, tiles = KL.row_grid(50257, cfg, DEVICE)
    assert tiles == 12565 and programs == KL.PERSISTENT_PROGRAMS_PER_SM * n_sm < tiles
    assert KL.row_grid(8, cfg, DEVICE) == (2, 2)
    # K past ROW_K_MAX (GPT-2's 3072-wide projection) and M > 1 take the K-loop kernel.
    assert not KL.uses_row_kernel(1, 3072, KL.default_config(1, 768, 3072, DEVICE))
    assert not KL.uses_row_kernel(2, 768, KL.default_config(2, 768, 768, DEVICE))


def test_llama_shapes_default_configs():
    """The configs the LLaMA shapes get without a measurement: the whole-row kernel for hidden sizes
    up to ROW_K_MAX (4 rows per tile at 576 / 896, 2 at 1536 / 2048: a silu_glu tile holds whole
    pairs), the K-loop for 3072 / 4096 and the down projections (K = F up to 14336), and every
    candidate's block_n even (tiles never split a (gate, up) pair)."""
    for K, block_n in ((576, 4), (896, 4), (1536, 2), (2048, 2)):
        cfg = KL.default_config(1, 2 * 8192, K, DEVICE)
        assert cfg == KL.row_config(K) and cfg.block_n == block_n and KL.uses_row_kernel(1, K, cfg)
    for K in (3072, 4096, 4864, 8192, 14336):
        assert not KL.uses_row_kernel(1, K, KL.default_config(1, 2048, K, DEVICE))
    # The LM heads at M == 1: persistent whole-row launches on a 132-SM GPU.
    for N, K in ((128256, 2048), (151936, 896), (49152, 576)):
        cfg = KL.row_config(K)
        n_tiles = -(-N // cfg.block_n)
        assert n_tiles > KL.PERSISTENT_MIN_TILES_PER_SM * 132, "persistent on an H100 / H200"
    for M in (1, 8):
        for K in LLAMA_HIDDEN:
            for cfg in KL.candidate_configs(M, 2 * 4 * K, K, DEVICE, exhaustive=True):
                assert cfg.block_n >= 2 and cfg.block_n % 2 == 0, cfg


def test_whole_row_kernel_combines_attention_partials(gemv_launches):
    partials, ref_attn = attention_step(1, 2, 64, 100, 64, 7, torch.float32, False, seed=11)
    inp = make_inputs(1, 40, 128, torch.float32, ln=False, lead=(1, 1), seed=4)
    del inp["x"], inp["ln_weight"], inp["ln_bias"]
    out = KL.linear(None, **inp, out=poisoned((1, 1, 40), torch.float32), attn_partials=partials)
    assert gemv_launches.row.launches == 1 and launch_record()["linear"]["attn_combine"]
    assert_close(out, reference_out_projection(ref_attn, inp), torch.float32, "whole-row + combine")


# --------------------------------------------------------------------------------------------
# the LLaMA family: RMSNorm prologue, SwiGLU (silu_glu) epilogue
# --------------------------------------------------------------------------------------------
_ROW = None  # the default config: the whole-row kernel at M == 1 and K <= ROW_K_MAX
_SPLIT3 = KL.GemvConfig(16, 64, 4, 1, 3)  # K-loop, 3 splits for K in (128, 192]
_SPLIT4 = KL.GemvConfig(16, 64, 4, 1, 4)

# (M, N, K, activation, bias, residual, config, kernel): the whole-row kernel (K = 576 -> one
# 1024-wide row; N = 40 -> 10 tiles of 4 rows: persistent on the interpreter's single "SM"), the
# M = 1 K loop with and without split-K, the tl.dot path (M in {2, 5}) with and without split-K.
LLAMA_CASES = [
    (1, 40, 576, "silu_glu", False, True, _ROW, "row"),  # SmolLM2's width, gate_up + residual
    (1, 40, 576, None, False, False, _ROW, "row"),  # q/k/v or the LM head: RMSNorm only
    (1, 36, 200, "silu_glu", True, True, _SPLIT3, "k_loop"),  # split-K: the finisher applies it
    (1, 40, 200, None, True, True, KL.GemvConfig(16, 64, 4, 1, 1), "k_loop"),  # LN_ROW statistics
    (2, 48, 200, "silu_glu", True, False, None, "k_loop"),
    (5, 40, 200, "silu_glu", False, True, _SPLIT4, "k_loop"),
    (5, 24, 576, None, True, True, _SPLIT3, "k_loop"),  # chunked statistics, split-K
]


@pytest.mark.parametrize("M, N, K, activation, bias, residual, config, kernel", LLAMA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rmsnorm_prologue_and_silu_glu_epilogue(M, N, K, activation, bias, residual, config, kernel, dtype, gemv_launches):
    glu = activation == "silu_glu"
    inp = make_inputs(M, N, K, dtype, bias=bias, residual=residual, norm="rmsnorm", glu=glu, seed=N * K + M)
    if config is not None:  # the split-K partials must all be written by this launch
        partials, counters = KL.workspace_for(M, N, config, K, DEVICE)
        partials.fill_(float("nan"))
    out = run_gemv(inp, activation, config, norm="rmsnorm", ln_eps=1e-6)
    assert out.shape == (M, N // 2 if glu else N)
    assert gemv_launches.launches == 1
    record = launch_record()["linear"]
    assert record["kernel"] == kernel and record["norm"] == "rmsnorm" and record["activation"] == activation
    assert_close(out, reference64(inp, activation, ln_eps=1e-6, norm="rmsnorm"), dtype, f"M={M} N={N} K={K} {activation} {config}")
    if config is not None and config.split_k > 1:
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("M, config", [(1, None), (1, _SPLIT3), (3, None)], ids=str)
def test_silu_glu_without_norm_and_with_layernorm(M, config):
    """silu_glu is independent of the prologue: no norm (bias + residual) and LayerNorm."""
    for ln in (False, True):
        inp = make_inputs(M, 34, 150, torch.float16, ln=ln, glu=True, seed=M + ln)
        out = run_gemv(inp, "silu_glu", config)
        assert_close(out, reference64(inp, "silu_glu"), torch.float16, f"M={M} ln={ln} {config}")


def test_silu_glu_in_place_residual_and_leading_dims():
    """(B, T, K) rows (M = B*T), the output written into the residual itself (x = x + mlp(x))."""
    inp = make_inputs(6, 32, 64, torch.float32, norm="rmsnorm", glu=True, lead=(2, 3), seed=7)
    expected = reference64(inp, "silu_glu", norm="rmsnorm")
    resid = inp["residual"]
    got = KL.linear(**inp, activation="silu_glu", norm="rmsnorm", out=resid)
    assert got.data_ptr() == resid.data_ptr() and got.shape == (2, 3, 16)
    assert_close(resid, expected, torch.float32, "in place")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_silu_glu_saturates_without_nan():
    """silu(g) = g / (1 + exp(-g)): a very negative gate gives -0 (exp overflows to inf), not NaN."""
    x = torch.ones(1, 8, device=DEVICE)
    gates, ups = [-1e3, 1e3, -30.0, 30.0, 1e-4], [2.0, -1.0, 1.0, 0.5, 3.0]
    w = torch.tensor([[v / 8] * 8 for pair in zip(gates, ups) for v in pair], device=DEVICE)  # (10, 8) interleaved
    out = KL.linear(x, w, activation="silu_glu")
    ref = reference.linear(x.double(), w.double(), activation="silu_glu")
    assert torch.isfinite(out).all() and out.shape == (1, 5)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("M", [3, 20])
def test_cublas_linear_rmsnorm_and_silu_glu(M, monkeypatch):
    """The cuBLAS side (prefill, or the plan's choice): one add_rmsnorm launch, the product, silu_glu."""
    from fastgpt.kernels import layernorm as LN

    rms_launches = LaunchCounter(LN._add_layernorm_kernel)
    monkeypatch.setattr(LN, "_add_layernorm_kernel", rms_launches)
    inp = make_inputs(M, 24, 40, torch.float32, norm="rmsnorm", glu=True)
    out = poisoned((M, 12), torch.float32)
    got = KL.cublas_linear(**inp, activation="silu_glu", norm="rmsnorm", ln_eps=1e-6, out=out)
    assert got is out and rms_launches.launches == 1
    assert_close(out, reference64(inp, "silu_glu", ln_eps=1e-6, norm="rmsnorm"), torch.float32, "cublas_linear")


def _bad_llama_calls():
    x, w, g = torch.randn(2, 8), torch.randn(6, 8), torch.ones(8)
    cases = [
        (dict(norm="rms"), ValueError, "norm must be one of 'layernorm', 'rmsnorm', got 'rms'"),
        (dict(norm=None), ValueError, "norm must be one of"),
        (dict(norm="rmsnorm", ln_weight=g, ln_bias=torch.zeros(8)), ValueError, "norm='rmsnorm' takes no ln_bias"),
        (dict(norm="rmsnorm", ln_weight=torch.ones(7)), ValueError, "ln_weight must be a contiguous \\(8,\\)"),
        (dict(norm="rmsnorm", ln_weight=g.half()), TypeError, "ln_weight must have dtype"),
        (dict(norm="rmsnorm", ln_weight=g, ln_eps=-1.0), ValueError, "ln_eps must be"),
        (dict(weight=torch.randn(5, 8), activation="silu_glu"), ValueError, "silu_glu' needs an even N"),
        (dict(activation="silu_glu", residual=torch.randn(2, 6)), ValueError, "residual must have shape \\(2, 3\\) \\(x's rows, N/2"),
        (dict(activation="silu_glu", out=torch.empty(2, 6)), ValueError, "out must have shape \\(2, 3\\)"),
        (dict(x=torch.randn(1, 8), activation="silu_glu", config=KL.GemvConfig(1, 64, 4, 1)), ValueError, "block_n >= 2"),
        (dict(activation="swiglu"), ValueError, "activation must be one of"),
    ]
    base = dict(x=x, weight=w)
    return [pytest.param(dict(base, **over), exc, msg, id=msg[:40]) for over, exc, msg in cases]


@pytest.mark.parametrize("kwargs, exc, message", _bad_llama_calls())
def test_llama_bad_inputs_raise_before_launch(kwargs, exc, message, gemv_launches, monkeypatch):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=message):
        KL.linear(**kwargs)
    assert gemv_launches.launches == 0
    if "config" not in kwargs:  # the cuBLAS side validates the same way, before any work
        mm = LaunchCounter(None)
        monkeypatch.setattr(torch, "mm", lambda *a, **k: mm[None])
        with pytest.raises(exc, match=message):
            KL.cublas_linear(**kwargs)
        assert mm.launches == 0


def test_pdl_switch(monkeypatch):
    """One switch for the kernels' USE_PDL and the launch's launch_pdl: on only for a CUDA device
    of capability >= 9 outside the interpreter, and off with FASTGPT_PDL=0."""
    from fastgpt.kernels import utils

    assert not utils.pdl_enabled("cpu")
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    monkeypatch.setattr(utils, "_capability_at_least_90", lambda index: index == 0)
    monkeypatch.delenv("FASTGPT_PDL", raising=False)
    assert utils.pdl_enabled("cuda:0") and not utils.pdl_enabled("cuda:1") and not utils.pdl_enabled("cpu")
    monkeypatch.setenv("FASTGPT_PDL", "0")
    assert not utils.pdl_enabled("cuda:0")
    monkeypatch.setattr(utils, "interpreting", lambda: True)
    monkeypatch.setenv("FASTGPT_PDL", "1")
    assert not utils.pdl_enabled("cuda:0"), "gdc_* cannot run under the interpreter"


def test_strided_rows_leading_dims_and_in_place_residual():
    B, T, K, N = 3, 4, 40, 24
    inp = make_inputs(B, N, K, torch.float16, lead=(B, T))
    # x[:, -1:] of a (B, T, K) tensor: (B, 1, K) rows with stride T*K (the model's last_only).
    x_last = inp["x"][:, -1:]
    resid_full = torch.randn(B, 2, N, dtype=torch.float16, device=DEVICE)
    resid = resid_full[:, 1:]  # (B, 1, N) with row stride 2N
    sub = dict(inp, x=x_last, residual=resid)
    expected = reference64(sub, None)
    out = KL.linear(**sub)  # allocated output
    assert out.shape == (B, 1, N)
    assert_close(out, expected, torch.float16, "strided rows")
    # In place into the residual (the model's x = x + proj): same result, same storage.
    ptr = resid.data_ptr()
    got = KL.linear(**sub, out=resid)
    assert got.data_ptr() == ptr
    assert_close(resid, expected, torch.float16, "in place")
    # (B, T, K) leading dims, M = B*T = 12.
    out = KL.linear(**inp, activation="gelu")
    assert_close(out, reference64(inp, "gelu"), torch.float16, "leading dims")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_gelu_tanh_saturates_without_nan():
    """Large |y|: exp overflow in the tanh form must give y or 0, never NaN."""
    K, N = 8, 6
    x = torch.ones(1, K, device=DEVICE)
    w = torch.tensor([[s * v] * K for s, v in [(1, 1e3), (-1, 1e3), (1, 1e-4), (-1, 1e-4), (1, 30), (-1, 30)]], device=DEVICE)
    out = KL.linear(x, w, activation="gelu_tanh")
    ref = reference.linear(x.double(), w.double(), activation="gelu_tanh")
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-9)


def _bad_calls():
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    cases = [
        (dict(x=torch.randn(17, 8)), ValueError, "1 <= M <= 16"),
        (dict(x=x.half()), TypeError, "weight must have dtype"),
        (dict(x=x.double(), weight=w.double()), TypeError, "x must have dtype"),
        (dict(x=x.int()), TypeError, "x must have dtype"),
        (dict(weight=torch.randn(5, 9)), ValueError, "weight must be \\(N, K=8\\)"),
        (dict(weight=torch.randn(8, 5).t()), ValueError, "contiguous along K"),
        (dict(bias=torch.randn(4)), ValueError, "bias must be a contiguous \\(5,\\)"),
        (dict(residual=torch.randn(2, 4)), ValueError, "residual must have shape \\(2, 5\\)"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(ln_weight=torch.ones(8)), ValueError, "given together"),
        (dict(ln_weight=torch.ones(7), ln_bias=torch.zeros(7)), ValueError, "ln_weight must be a contiguous \\(8,\\)"),
        (dict(ln_weight=torch.ones(8), ln_bias=torch.zeros(8), ln_eps=0.0), ValueError, "ln_eps must be"),
        (dict(out=torch.empty(2, 4)), ValueError, "out must have shape \\(2, 5\\)"),
        (dict(out=torch.empty(1, 5).expand(2, 5)), ValueError, "out's rows overlap"),
        (dict(x=torch.randn(2, 16)[:, ::2]), ValueError, "x must be contiguous in its last dimension"),
        (dict(x=torch.randn(4, 3, 8).transpose(0, 1)), ValueError, "cannot be viewed as rows"),
        (dict(config=KL.GemvConfig(24, 64, 4, 1)), ValueError, "config.block_n must be a power of two"),
        (dict(config=KL.GemvConfig(8, 64, 4, 1)), ValueError, "tl.dot"),
        (dict(config=KL.GemvConfig(16, 64, 3, 1)), ValueError, "num_warps"),
        (dict(config=KL.GemvConfig(16, 64, 4, 1, 0)), ValueError, "split_k"),
        (dict(config=(16, 64, 4, 1)), TypeError, "GemvConfig"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    ]
    base = dict(x=x, weight=w)
    return [pytest.param(dict(base, **over), exc, msg, id=msg[:40]) for over, exc, msg in cases]


@pytest.mark.parametrize("kwargs, exc, message", _bad_calls())
def test_bad_inputs_raise_before_launch(kwargs, exc, message, gemv_launches):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=message):
        KL.linear(**kwargs)
    assert gemv_launches.launches == 0


def test_out_must_not_overlap_inputs(gemv_launches):
    buf = torch.randn(2, 16, device=DEVICE)
    x, w = buf[:, :8], torch.randn(8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out must not overlap x"):
        KL.linear(x, w, out=buf[:, 8:])  # rows interleaved with x's: refused (conservative check)
    with pytest.raises(ValueError, match="out must not overlap x"):
        KL.linear(x, w, out=x)
    assert gemv_launches.launches == 0


def test_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setattr(KL, "triton_usable_on", lambda device: False)
    with pytest.raises(ValueError, match="runs a Triton kernel"):
        KL.linear(torch.randn(1, 8), torch.randn(4, 8))


# --------------------------------------------------------------------------------------------
# configs, buckets, the plan, the cuBLAS side
# --------------------------------------------------------------------------------------------
def test_buckets_and_split_heuristic():
    assert [KL.m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 17]
    assert backend.GEMV_MAX_M == KL.GEMV_MAX_M
    for K, bk, split in [(768, 256, 1), (768, 256, 3), (768, 256, 5), (3072, 128, 32), (77, 512, 4)]:
        n_split, per = KL._effective_split(K, bk, split)
        assert per % bk == 0 and 1 <= n_split <= max(1, split)
        assert (n_split - 1) * per < K <= n_split * per, "no empty split, all of K covered"
    # 768 -> 768 at M=1 on a 132-SM GPU needs split-K to fill the machine.
    assert KL._split_for(768, 3072, 16, 256, 132) > 1
    assert KL._split_for(50257, 768, 16, 256, 132) == 1


def test_candidate_configs_cover_every_tile_and_are_unique():
    for M, tiles in ((1, KL.M1_TILES), (8, KL.DOT_TILES)):
        # M == 1 with K <= ROW_K_MAX: the whole-row config first, then the K-loop tiles.
        row = [KL.row_config(768)] if M == 1 else []
        every = KL.candidate_configs(M, 2304, 768, DEVICE, exhaustive=True)
        assert len(every) == len(set(every)) and every[: len(row)] == row
        assert {(c.block_n, c.block_k, c.num_warps, c.num_stages) for c in every[len(row):]} == set(tiles)
        auto = KL.candidate_configs(M, 2304, 768, DEVICE)
        assert len(auto) == KL.AUTO_TILES + len(row) and set(auto) <= set(every)
        assert KL.default_config(M, 2304, 768, DEVICE) == auto[0]


@pytest.mark.parametrize("M", [3, 20])
def test_cublas_linear_matches_reference(M):
    inp = make_inputs(M, 24, 40, torch.float32)
    out = poisoned((M, 24), torch.float32)
    KL.cublas_linear(**inp, activation="gelu_tanh", out=out)
    assert_close(out, reference64(inp, "gelu_tanh"), torch.float32, "cublas_linear")
    with pytest.raises(ValueError, match="out must not be the residual"):
        KL.cublas_linear(**inp, out=inp["residual"])


# --------------------------------------------------------------------------------------------
# the backend dispatch and the model
# --------------------------------------------------------------------------------------------
class _Lin:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


class _LN:
    def __init__(self, weight, bias, eps=1e-5):
        self.weight, self.bias, self.eps = weight, bias, eps


@pytest.mark.parametrize("M", [2, 20])  # the GEMV, and the cuBLAS (prefill) path
def test_backend_ops_match_the_torch_backend(M, monkeypatch):
    monkeypatch.setenv("FASTGPT_LINEAR", "triton")  # the kernel, not a per-shape measurement, on GPUs
    inp = make_inputs(M, 24, 40, torch.float32)
    layer, ln = _Lin(inp["weight"], inp["bias"]), _LN(inp["ln_weight"], inp["ln_bias"])
    x, delta = inp["x"], torch.randn_like(inp["x"])
    resid = inp["residual"]
    phase = "gemv" if M <= 16 else "gemm"
    impl = "triton" if M <= 16 else "cublas"

    reset_kernels_report()
    y_t, s_t = backend.ln_linear(x, delta, ln, layer, "triton", activation="gelu_tanh", op="fc")
    y_r, s_r = backend.ln_linear(x, delta, ln, layer, "torch", activation="gelu_tanh", op="fc_ref")
    assert kernels_report()[f"linear.fc.{phase}"] == impl
    assert kernels_report()[f"linear.fc_ref.{phase}"] == "torch"
    assert torch.allclose(y_t, y_r, atol=1e-5) and torch.allclose(s_t, s_r, atol=1e-6)

    y = torch.randn(*x.shape[:-1], 40, device=DEVICE)  # (M, 40): the projection's input
    proj = _Lin(torch.randn(24, 40, device=DEVICE) * 0.1, torch.randn(24, device=DEVICE))
    x_t, d_t = backend.residual_linear(y, proj, resid, "triton", op="proj")
    x_r, d_r = backend.residual_linear(y, proj, resid, "torch", op="proj_ref")
    assert (d_t is None) == (M <= 16), "the GEMV adds the residual; cuBLAS defers it"
    total_t = x_t if d_t is None else x_t + d_t
    assert torch.allclose(total_t, x_r + d_r, atol=1e-5)


def _tiny_model(n_layer=2, seed=0, n_embd=128, vocab=301, dtype=torch.float32):
    """head_dim 64 with n_embd 128 (what the Triton attention takes), odd vocab, non-zero biases."""
    cfg = GPTConfig(vocab_size=vocab, n_positions=64, n_embd=n_embd, n_head=2, n_layer=n_layer)
    model = GPT.from_config(cfg, seed=seed, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "ln_" in name:
                p.uniform_(0.8, 1.2)
    return model


def _run_steps(model, ids, n_decode, backend_name, monkeypatch, attention_on_torch):
    with monkeypatch.context() as mp:
        mp.setenv("FASTGPT_BACKEND", backend_name)
        if attention_on_torch:
            real = backend.attention
            mp.setattr(backend, "attention", lambda q, k, v, c, i, b, **kw: real(q, k, v, c, i, "torch", **kw))
            # The fused attention + out-projection too: torch attention, then our projection.
            mp.setattr(
                backend, "attention_residual_linear",
                lambda q, k, v, c, i, p, x, b, **kw: backend.residual_linear(
                    real(q, k, v, c, i, "torch", **kw).flatten(2), p, x, b, op="attn_proj"
                ),
            )  # fmt: skip
        return _steps(model, ids, n_decode)


def _steps(model, ids, n_decode):
    reports, logits = [], []
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + n_decode)
        reset_kernels_report()
        logits.append(model(ids, cache))  # prefill: M = B*T > 16, cuBLAS + add/LayerNorm kernels
        reports.append(kernels_report())
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
        for _ in range(n_decode):  # decode: M = B, the fused GEMVs
            reset_kernels_report()
            logits.append(model(token, cache))
            reports.append(kernels_report())
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
    return logits, reports


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU: test_model_triton_backend_matches_torch_cuda")
def test_model_triton_backend_matches_torch_backend(monkeypatch, gemv_launches):
    """Our fused ops end to end, attention on the PyTorch path (kernels/attention_*.py are tested
    on their own): fp32 logits within 1e-4 at prefill and at every decode step."""
    monkeypatch.delenv("FASTGPT_LINEAR", raising=False)
    model = _tiny_model(n_embd=64, vocab=97)  # small: every interpreted program costs ~0.1 s
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref, _ = _run_steps(model, ids, 1, "torch", monkeypatch, attention_on_torch=False)
    launches_before = gemv_launches.launches
    got, reports = _run_steps(model, ids, 1, "triton", monkeypatch, attention_on_torch=True)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    ops = ("qkv", "attn_proj", "fc", "mlp_proj", "lm_head")
    assert all(reports[0][f"linear.{op}.gemm"] == "cublas" for op in ops)
    assert all(reports[0][f"layernorm.{op}"] == "triton" for op in ("qkv", "fc", "lm_head"))
    for rep in reports[1:]:
        assert all(rep[f"linear.{op}.gemv"] == "triton" for op in ops), rep
        assert not any(k.startswith("layernorm.") for k in rep), "decode LayerNorms run inside the GEMVs"
    # By construction: 4 GEMV launches per layer and one for ln_f + LM head, per decode step.
    assert gemv_launches.launches - launches_before == 4 * model.config.n_layer + 1


def _triton_attention_importable() -> str | None:
    try:
        import fastgpt.kernels.attention_decode  # noqa: F401
        import fastgpt.kernels.attention_prefill  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return f"the attention kernels do not import: {exc!r}"
    return None


@pytest.mark.skipif(_triton_attention_importable() is not None, reason=str(_triton_attention_importable()))
def test_model_full_triton_backend_matches_torch_backend(monkeypatch):
    """FASTGPT_BACKEND=triton with every kernel (attention too): logits within 1e-4 (fp32)."""
    monkeypatch.setenv("FASTGPT_LINEAR", "triton")
    model = _tiny_model(n_layer=1, seed=1, vocab=97)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref, _ = _run_steps(model, ids, 1, "torch", monkeypatch, attention_on_torch=False)
    got, reports = _run_steps(model, ids, 1, "triton", monkeypatch, attention_on_torch=False)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert reports[-1]["linear.qkv.gemv"] == "triton" and reports[-1]["attention.decode"] == "triton"


@pytest.mark.skipif(_triton_attention_importable() is not None, reason=str(_triton_attention_importable()))
def test_model_decode_combines_attention_in_the_out_projection(monkeypatch):
    """A decode step with several attention splits: the out-projection combines them (no combine
    kernel), one split launch and 4 GEMVs per layer, logits equal the torch backend's (1e-4, fp32)."""
    import fastgpt.kernels.attention_decode as AD_mod

    monkeypatch.setenv("FASTGPT_LINEAR", "triton")
    monkeypatch.setattr(AD_mod, "DECODE_MIN_CHUNK", 4)  # 12-slot cache -> 3 splits of 4
    assert AD_mod.decode_num_splits(1, 2, 12) == 3
    model = _tiny_model(n_layer=2, seed=2, vocab=97)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref, _ = _run_steps(model, ids, 2, "torch", monkeypatch, attention_on_torch=False)
    gemv = _GemvLaunches(monkeypatch)
    combine_runs = []
    real_combine = AD_mod._decode_combine_kernel.run
    monkeypatch.setattr(AD_mod._decode_combine_kernel, "run", lambda *a, **k: combine_runs.append(1) or real_combine(*a, **k))
    with monkeypatch.context() as mp:
        mp.setenv("FASTGPT_BACKEND", "triton")
        with torch.no_grad():
            cache = model.new_cache(1, 12)
            got = [model(ids, cache)]
            for step in range(2):
                token = got[-1][:, -1].argmax(-1, keepdim=True)
                before = gemv.launches
                reset_kernels_report()
                got.append(model(token, cache))
                report = kernels_report()
                assert report["attention.decode"] == "triton" and report["attention.combine"] == "attn_proj", report
                assert gemv.launches - before == 4 * model.config.n_layer + 1
                assert launch_record()["attention_decode"]["n_split"] == 3
    assert not combine_runs, "the combine kernel ran: the out-projection should have combined the splits"
    for step, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"


# --------------------------------------------------------------------------------------------
# sm_90 compile checks (a subprocess without TRITON_INTERPRET: real JITFunctions)
# --------------------------------------------------------------------------------------------
_ALL_FLAGS = dict(HAS_BIAS=True, ACTIVATION=1, HAS_RESIDUAL=True, NORM=1)
#: The LLaMA family's superset: RMSNorm prologue, interleaved bias, silu_glu, residual.
_LLAMA_FLAGS = dict(HAS_BIAS=True, ACTIVATION=KL.ACTIVATIONS["silu_glu"], HAS_RESIDUAL=True, NORM=KL.NORM_CODES["rmsnorm"])
#: Hidden sizes of the LLaMA-family presets (SmolLM2-135M ... Llama-3.1-8B / Mistral-7B).
LLAMA_HIDDEN = (576, 896, 1536, 2048, 3072, 4096)


def _compile_specs() -> list[dict]:
    """Every tile in its M regime at float16 with the split-K code (the superset of the kernel),
    the default tiles without split, the tensor-core tiles at float32 (IEEE FMA dots: the most
    shared memory), and the default tiles at float32 / bfloat16."""
    specs = []
    for block_m, tiles in ((1, KL.M1_TILES), (16, KL.DOT_TILES)):
        for i, tile in enumerate(tiles):
            specs.append(dict(dtype="fp16", block_m=block_m, tile=list(tile), split=True))
            if i == 0:
                specs.append(dict(dtype="fp16", block_m=block_m, tile=list(tile), split=False))
    specs += [dict(dtype="fp32", block_m=16, tile=list(t), split=True) for t in KL.DOT_TILES]
    for dtype in ("fp32", "bf16"):
        specs.append(dict(dtype=dtype, block_m=1, tile=list(KL.M1_TILES[0]), split=True))
    specs.append(dict(dtype="bf16", block_m=16, tile=list(KL.DOT_TILES[0]), split=True))
    # The out-projection with the attention combine in its prologue (no LayerNorm there).
    for block_m, tiles in ((1, KL.M1_TILES), (16, KL.DOT_TILES)):
        for split in (False, True):
            specs.append(dict(dtype="fp16", block_m=block_m, tile=list(tiles[0]), split=split, attn=64))
    # The whole-row kernel at GPT-2's and GPT-2 XL's widths (block_m 1, no split), with LayerNorm
    # (QKV, FC, the LM head) and with the attention combine (the out-projection).
    for dt, K in (("fp16", 768), ("fp16", 1600), ("fp32", 1600), ("bf16", 768)):
        cfg = KL.row_config(K)
        specs.append(dict(dtype=dt, block_m=1, tile=[cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages], split=False, row=True))
    specs.append(dict(dtype="fp16", block_m=1, tile=[4, 1024, 4, 1], split=False, row=True, attn=64))
    return specs + _llama_compile_specs()


def _llama_compile_specs() -> list[dict]:
    """Every config the plan can pick for the LLaMA shapes, with the RMSNorm + silu_glu superset.

    The whole-row configs of the hidden sizes up to ROW_K_MAX (q/k/v, gate_up, the LM heads at
    M == 1) at fp16 / bf16 / fp32; every M == 1 K-loop tile with split-K and the widest one-load
    statistics row (LN_ROW 4096: K = 3072 / 4096), fp16 and bf16; every tensor-core tile with
    split-K (chunked statistics) at fp16, bf16 and fp32 (IEEE dots: the most shared memory).
    """
    specs = []
    row_tiles = sorted({tuple(vars(KL.row_config(K)).values())[:4] for K in LLAMA_HIDDEN if K <= KL.ROW_K_MAX})
    for dt in ("fp16", "bf16", "fp32"):
        for tile in row_tiles:
            specs.append(dict(dtype=dt, block_m=1, tile=list(tile), split=False, row=True, llama=True))
    for dt in ("fp16", "bf16"):
        for tile in KL.M1_TILES:
            specs.append(dict(dtype=dt, block_m=1, tile=list(tile), split=True, ln_row=KL.LN_ROW_MAX, llama=True))
    for dt in ("fp16", "bf16", "fp32"):
        for tile in KL.DOT_TILES:
            specs.append(dict(dtype=dt, block_m=16, tile=list(tile), split=True, llama=True))
    return specs


def _barrier_between_stores_and(lines: list[str], atom: int) -> bool:
    """A ``bar.sync`` after the last global store that precedes the atomic (the partials)."""
    last_store = max(i for i in range(atom) if "st.global" in lines[i])
    return any("bar.sync" in line for line in lines[last_store:atom])


def _loads_before_wait(lines: list[str]) -> int:
    """Global loads the PTX issues before its first ``griddepcontrol.wait`` (the weight stream)."""
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), len(lines))
    return sum(1 for line in lines[:wait] if "ld.global" in line)


def _compile_worker() -> None:
    """Subprocess entry: compile the JSON specs on stdin for sm_90, print JSON results.

    Integer arguments and pointers get Triton's divisible-by-16 specialisation (what a launch on
    GPT-2's shapes gets), so the PTX shows the vectorised loads the GPU will run.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastgpt.kernels.utils import compile_for_hopper

    results = []
    for spec in json.loads(sys.stdin.read()):
        dt = spec["dtype"]
        bn, bk, warps, stages = spec["tile"]
        attn = spec.get("attn", 0)
        flags = _LLAMA_FLAGS if spec.get("llama") else dict(_ALL_FLAGS, NORM=0) if attn else _ALL_FLAGS
        kernel = KL._gemv_row_kernel if spec.get("row") else KL._gemv_kernel
        if spec.get("row"):
            constexprs = dict(flags, BLOCK_N=bn, ROW_K=bk, ATTN_HEAD_DIM=attn, USE_PDL=True)
        else:
            constexprs = dict(
                flags, LN_ROW=spec.get("ln_row", 2048 if spec["block_m"] == 1 and not attn else 0),  # XL's 1600 features
                USE_SPLIT=spec["split"], BLOCK_M=spec["block_m"], BLOCK_N=bn, BLOCK_K=bk,
                DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST_DOT=False,
                ATTN_HEAD_DIM=attn, USE_PDL=True,  # the decode step's kernel, as it runs on sm_90
            )  # fmt: skip
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "part_ptr":
                signature[name] = "*fp32"
            elif name in ("count_ptr", "attn_pos_ptr"):
                signature[name] = "*i32"
            elif name.startswith("attn_") and name.endswith("_ptr"):
                signature[name] = "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*" + dt
            elif name == "ln_eps":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        # compile_for_hopper (no argument specialisation) where shared memory peaks: fp32 dots.
        plain_shared = 0
        if dt == "fp32" and spec["block_m"] == 16 and not spec.get("row"):
            plain_shared = compile_for_hopper(kernel, signature, constexprs, warps, stages).metadata.shared
        divisible = [n for n in signature if signature[n] != "constexpr" and n not in ("M", "n_split", "ln_eps") and not n.startswith("attn_")]
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        special = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = special.asm["ptx"]
        lines = ptx.splitlines()
        atom = [i for i, line in enumerate(lines) if "atom.global" in line]
        results.append(
            dict(
                spec=spec,
                shared=max(plain_shared, special.metadata.shared),
                mma="mma.sync" in ptx,
                vector_loads="ld.global.v4" in ptx or "ld.global.nc.v4" in ptx,
                atoms=[lines[i].strip() for i in atom],
                barrier_before_atom=bool(atom) and _barrier_between_stores_and(lines, atom[0]),
                cg_loads="ld.global.cg" in ptx,
                pdl=["griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx],
                loads_before_wait=_loads_before_wait(lines),
                spills=spill_bytes(special.asm["cubin"]),
            )
        )
    print(json.dumps(results))


def test_every_config_compiles_for_sm90():
    specs = _compile_specs()
    results = run_compile_workers("test_linear", specs)
    for r in results:
        spec = r["spec"]
        assert r["shared"] <= H100_SHARED_MEMORY_BYTES, f"{spec}: {r['shared']} B of shared memory"
        assert r["vector_loads"], f"{spec}: no 16-byte loads of W"
        assert r["spills"] == 0, f"{spec}: {r['spills']} B of register spills"
        assert r["pdl"] == [True, True], f"{spec}: griddepcontrol.wait / launch_dependents missing"
        if spec["block_m"] == 1:  # the first weight tile is in flight before the wait
            assert r["loads_before_wait"] >= 4, f"{spec}: {r['loads_before_wait']} loads before griddepcontrol.wait"
        if spec["block_m"] == 16:
            assert r["mma"] == (spec["dtype"] != "fp32"), f"{spec}: half dots on tensor cores, fp32 IEEE"
        if spec["split"]:
            # One releasing/acquiring atomic, after a CTA barrier, partials read past L1.
            assert len(r["atoms"]) == 1 and "acq_rel" in r["atoms"][0] and ".gpu" in r["atoms"][0], r["atoms"]
            assert r["barrier_before_atom"] and r["cg_loads"], spec
        else:
            assert not r["atoms"], spec
    assert any(r["spec"].get("row") for r in results) and any(r["spec"].get("attn") for r in results)
    tiles_covered = {(r["spec"]["block_m"], tuple(r["spec"]["tile"])) for r in results}
    assert tiles_covered >= {(1, t) for t in KL.M1_TILES} | {(16, t) for t in KL.DOT_TILES}
    llama = {(r["spec"]["dtype"], r["spec"]["block_m"], tuple(r["spec"]["tile"])) for r in results if r["spec"].get("llama")}
    for dt in ("fp16", "bf16"):  # every config the plan can pick for the LLaMA shapes, RMSNorm + silu_glu
        for M, N, K in [(m, n, k) for m in (1, 16) for k in LLAMA_HIDDEN for n in (2 * k, 8 * k)]:
            for cfg in KL.candidate_configs(M, N, K, "cpu", exhaustive=True):
                tile = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
                assert (dt, 1 if M == 1 else 16, tile) in llama, f"{dt} M={M} N={N} K={K}: {cfg} not compiled"


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
#: GPT-2 small's decode shapes and XL's largest (N, K), with the epilogue each has in the model
#: (XL's other two shapes are the same kernels at sizes in between; kept out for compile time).
GPT2_SHAPES = {
    "small.qkv": (2304, 768, "ln+bias"),
    "small.attn_proj": (768, 768, "bias+residual"),
    "small.fc": (3072, 768, "ln+bias+gelu_tanh"),
    "small.mlp_proj": (768, 3072, "bias+residual"),
    "small.lm_head": (50257, 768, "ln_only"),
    "xl.qkv": (4800, 1600, "ln+bias"),
    "xl.fc": (6400, 1600, "ln+bias+gelu_tanh"),
    "xl.mlp_proj": (1600, 6400, "bias+residual"),
    "xl.lm_head": (50257, 1600, "ln_only"),  # the persistent whole-row kernel at M = 1
}


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("H, S_max, pos, n_split", [(12, 1024, 700, None), (25, 2048, 2047, None), (12, 1000, 300, 9)])
def test_out_projection_combine_gpt2_shapes_cuda(B, H, S_max, pos, n_split, gemv_launches):
    """GPT-2 small / XL out-projections (C = 768, 1600) consuming the decode attention's partials."""
    if n_split is None:
        n_split = AD.decode_num_splits(B, H, S_max)
    partials, ref_attn = attention_step(B, H, 64, S_max, pos, n_split, torch.float16, True, seed=B)
    C = H * 64
    inp = make_inputs(B, C, C, torch.float16, ln=False, lead=(B, 1), seed=C)
    del inp["x"], inp["ln_weight"], inp["ln_bias"]
    out = KL.linear(None, **inp, out=poisoned((B, 1, C), torch.float16), attn_partials=partials)
    torch.cuda.synchronize()
    assert gemv_launches.launches == 1
    assert_close(out, reference_out_projection(ref_attn, inp), torch.float16, f"B={B} C={C} n_split={n_split}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 7, 16])
@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_gpt2_shapes_fp16_cuda(shape, M, gemv_launches):
    N, K, epilogue = GPT2_SHAPES[shape]
    spec = dict(EPILOGUES[epilogue])
    activation = spec.pop("activation")
    inp = make_inputs(M, N, K, torch.float16, **spec)
    out = run_gemv(inp, activation)  # default config (split-K where the heuristic splits)
    torch.cuda.synchronize()
    assert gemv_launches.launches == 1
    assert_close(out, reference64(inp, activation), torch.float16, f"{shape} M={M}")


#: Llama-3.2-1B's decode shapes (hidden 2048, MLP 8192, vocab 128,256) and Qwen2.5-0.5B's (896,
#: 4864, 151,936; q/k/v with bias): (N, K, norm, activation, bias, residual); gate_up is the
#: row-interleaved (2F, K) weight.
LLAMA_SHAPES = {
    "llama1b.qkv": (3072, 2048, "rmsnorm", None, False, False),
    "llama1b.o_proj": (2048, 2048, None, None, False, True),
    "llama1b.gate_up": (16384, 2048, "rmsnorm", "silu_glu", False, False),
    "llama1b.down": (2048, 8192, None, None, False, True),
    "llama1b.lm_head": (128256, 2048, "rmsnorm", None, False, False),
    "qwen0.5b.qkv": (1152, 896, "rmsnorm", None, True, False),
    "qwen0.5b.gate_up": (9728, 896, "rmsnorm", "silu_glu", False, False),
    "qwen0.5b.down": (896, 4864, None, None, False, True),
    "qwen0.5b.lm_head": (151936, 896, "rmsnorm", None, False, False),
}


def llama_inputs(shape, M, dtype, seed=0):
    N, K, norm, activation, bias, residual = LLAMA_SHAPES[shape]
    inp = make_inputs(M, N, K, dtype, bias=bias, residual=residual, ln=norm is not None, norm="rmsnorm", glu=activation == "silu_glu", seed=seed)
    return inp, activation, dict(norm="rmsnorm", ln_eps=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_llama_shapes_cuda(shape, dtype, M, gemv_launches):
    inp, activation, kw = llama_inputs(shape, M, dtype)
    out = run_gemv(inp, activation, **kw)  # default config (whole-row / persistent / split-K)
    torch.cuda.synchronize()
    assert gemv_launches.launches == 1
    assert_close(out, reference64(inp, activation, **kw), dtype, f"{shape} {dtype} M={M}")
    ref_cublas = KL.cublas_linear(**inp, activation=activation, **kw)
    assert_close(ref_cublas, reference64(inp, activation, **kw), dtype, f"cublas_linear {shape} {dtype} M={M}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("shape", ["llama1b.gate_up", "llama1b.qkv", "qwen0.5b.gate_up"])
def test_every_candidate_config_llama_cuda(shape, M):
    """Every config the measurement may choose for a LLaMA op (RMSNorm, silu_glu), and each tile without split-K."""
    inp, activation, kw = llama_inputs(shape, M, torch.bfloat16, seed=1)
    ref = reference64(inp, activation, **kw)
    N, K = inp["weight"].shape
    candidates = KL.candidate_configs(M, N, K, "cuda", exhaustive=True)
    for cfg in candidates + [c.with_split(1) for c in candidates]:
        out = run_gemv(inp, activation, cfg, **kw)
        assert_close(out, ref, torch.bfloat16, f"{shape} {cfg}")


@pytest.mark.cuda
def test_silu_glu_split_k_under_cuda_graph_replay():
    """gate_up with RMSNorm and split-K replayed from a graph: the finisher applies silu_glu."""
    M, N, K = 1, 2048, 4096
    cfg = KL.GemvConfig(16, 256, 4, 3, 4)
    inp = make_inputs(M, N, K, torch.bfloat16, bias=False, norm="rmsnorm", glu=True)
    out = torch.empty(M, N // 2, dtype=torch.bfloat16, device="cuda")
    kw = dict(activation="silu_glu", norm="rmsnorm", out=out, config=cfg)
    KL.linear(**inp, **kw)  # eager first: compile + workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        KL.linear(**inp, **kw)
    for i in range(3):
        inp["x"].normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference64(inp, "silu_glu", norm="rmsnorm"), torch.bfloat16, f"replay {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["small.qkv", "small.mlp_proj", "xl.fc"])
def test_gpt2_shapes_fp32_bf16_cuda(shape, dtype, M):
    N, K, _ = GPT2_SHAPES[shape]
    inp = make_inputs(M, N, K, dtype)
    out = run_gemv(inp, "gelu_tanh")
    assert_close(out, reference64(inp, "gelu_tanh"), dtype, f"{shape} {dtype} M={M}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5])
def test_every_candidate_config_cuda(M):
    """Every config the measurement may choose, on the shape where split-K matters most."""
    N, K = 768, 3072
    inp = make_inputs(M, N, K, torch.float16)  # every stage on: LN + bias + GELU + residual
    ref = reference64(inp, "gelu_tanh")
    candidates = KL.candidate_configs(M, N, K, "cuda", exhaustive=True)
    for cfg in candidates + [c.with_split(1) for c in candidates]:  # and each tile without split-K
        out = run_gemv(inp, "gelu_tanh", cfg)
        assert_close(out, ref, torch.float16, str(cfg))


@pytest.mark.cuda
def test_split_k_under_cuda_graph_replay():
    """The counters reset by the finishing split make replays correct; replays allocate nothing."""
    M, N, K = 1, 768, 3072
    cfg = KL.GemvConfig(16, 256, 4, 3, 6)
    inp = make_inputs(M, N, K, torch.float16, ln=False)
    out = torch.empty(M, N, dtype=torch.float16, device="cuda")
    KL.linear(**inp, out=out, config=cfg)  # eager first: compile + workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        KL.linear(**inp, out=out, config=cfg)
    for i in range(5):
        inp["x"].normal_()
        inp["residual"].normal_()
        out.fill_(float("nan"))
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_stats()["allocation.all.allocated"]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocated, "a replay allocated"
        assert_close(out, reference64(inp, None), torch.float16, f"replay {i}")
    _, counters = KL.workspace_for(M, N, cfg, K, "cuda")
    assert int(counters.abs().sum()) == 0


def _libcudart():
    """ctypes handle on the CUDA runtime torch loaded (libcudart.so.12 or .so)."""
    import ctypes

    for name in ("libcudart.so.12", "libcudart.so", "libcudart.so.13"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    pytest.skip("libcudart could not be loaded with ctypes: cannot read the captured graph")


def _programmatic_edges(graph: torch.cuda.CUDAGraph) -> int:
    """Edges of type cudaGraphDependencyTypeProgrammatic (= 1) in a captured graph.

    A launch with cudaLaunchAttributeProgrammaticStreamSerialization, stream-captured, becomes a
    programmatic dependency edge into its kernel node (CUDA >= 12.3, cudaGraphGetEdges_v2);
    the kernel node attribute is not what capture records, so the edges are read.
    """
    import ctypes

    rt = _libcudart()
    if not hasattr(rt, "cudaGraphGetEdges_v2"):
        pytest.skip("this CUDA runtime has no cudaGraphGetEdges_v2 (CUDA < 12.3): edge types unreadable")

    class EdgeData(ctypes.Structure):  # cudaGraphEdgeData
        _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte), ("reserved", ctypes.c_ubyte * 5)]

    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t(0)
    assert rt.cudaGraphGetEdges_v2(raw, None, None, None, ctypes.byref(count)) == 0
    n = count.value
    src, dst = (ctypes.c_void_p * max(n, 1))(), (ctypes.c_void_p * max(n, 1))()
    data = (EdgeData * max(n, 1))()
    assert rt.cudaGraphGetEdges_v2(raw, src, dst, data, ctypes.byref(count)) == 0
    return sum(1 for i in range(n) if data[i].type == 1)


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["1", "0"])
def test_pdl_survives_cuda_graph_capture(pdl, monkeypatch):
    """Two dependent GEMVs (LayerNorm + FC, then the projection) captured in a graph: with PDL on
    the second is a programmatic dependency of the first; FASTGPT_PDL=0 leaves none. Replay is
    exact either way."""
    from fastgpt.kernels.utils import pdl_enabled

    monkeypatch.setenv("FASTGPT_PDL", pdl)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    assert pdl_enabled("cuda") == (pdl == "1")
    first = make_inputs(1, 3072, 768, torch.float16, residual=False, seed=1)
    second = make_inputs(1, 768, 3072, torch.float16, ln=False, seed=2)
    h = torch.empty(1, 3072, dtype=torch.float16, device="cuda")
    out = torch.empty(1, 768, dtype=torch.float16, device="cuda")

    def step():
        KL.linear(**first, activation="gelu_tanh", out=h)
        KL.linear(h, second["weight"], second["bias"], residual=second["residual"], out=out)

    step()  # compile, allocate the split-K workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        step()
    edges = _programmatic_edges(graph)
    assert (edges > 0) == (pdl == "1"), f"{edges} programmatic edges with FASTGPT_PDL={pdl}"
    graph.replay()
    torch.cuda.synchronize()
    ref_h = reference64(first, "gelu_tanh")
    assert_close(h, ref_h, torch.float16, "graph replay, first GEMV")
    ref = reference64(dict(second, x=h), None)
    assert_close(out, ref, torch.float16, "graph replay, second GEMV")


@pytest.mark.cuda
def test_model_triton_backend_matches_torch_cuda(monkeypatch):
    monkeypatch.setenv("FASTGPT_LINEAR", "triton")  # the fused GEMVs (no per-shape measurement)
    model = _tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    ref, _ = _run_steps(model, ids, 3, "torch", monkeypatch, attention_on_torch=False)
    got, reports = _run_steps(model, ids, 3, "triton", monkeypatch, attention_on_torch=True)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert all(reports[-1][f"linear.{op}.gemv"] == "triton" for op in ("qkv", "attn_proj", "fc", "mlp_proj", "lm_head"))


@pytest.mark.cuda
def test_decode_step_kernels_per_layer_cuda(monkeypatch):
    """Count the CUDA kernels of one eager decode step with torch.profiler, for 2 and 4 layers:
    the difference per layer is what one layer launches (4 fused GEMVs + attention)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    monkeypatch.setenv("FASTGPT_LINEAR", "triton")  # count the fused path whatever the timings
    counts, gemvs = {}, {}
    for n_layer in (2, 4):
        model = _tiny_model(n_layer=n_layer, dtype=torch.float16)
        with torch.no_grad():
            cache = model.new_cache(1, 16)
            model(torch.zeros(1, 4, dtype=torch.long, device="cuda"), cache)
            token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
            model(token, cache)  # warm (compiles, workspaces)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(token, cache)
                torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts[n_layer] = len(names)
        gemvs[n_layer] = sum("_gemv_kernel" in n for n in names)
        assert not any("_add_layernorm_kernel" in n for n in names), names
    assert gemvs == {2: 4 * 2 + 1, 4: 4 * 4 + 1}
    per_layer = (counts[4] - counts[2]) / 2
    assert per_layer <= 6, f"{per_layer} kernels per layer (4 GEMVs + attention expected)"
