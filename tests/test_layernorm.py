"""add + LayerNorm and add + RMSNorm (kernels/layernorm.py) against fastgpt.reference's
add_layernorm / add_rmsnorm in float64.

Outputs are poisoned with NaN before each launch. The residual sum ``s`` must equal PyTorch's
``x + residual`` bit for bit (both round the float32 sum to the dtype once); the Triton 3.6
interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest, so on the CPU a
bfloat16 ``s`` may differ from PyTorch's by one unit in the last place (exact on CUDA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import reference
from fastgpt.kernels import layernorm as LN
from fastgpt.kernels.utils import launch_record
from tests.kernel_helpers import LaunchCounter, run_compile_workers, spill_bytes
from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: max |h - ref| relative to max |ref|: the output's rounding to the dtype (fp32: reduction noise).
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def ln_launches(monkeypatch):
    counter = LaunchCounter(LN._add_layernorm_kernel)
    monkeypatch.setattr(LN, "_add_layernorm_kernel", counter)
    return counter


def make(shape, dtype, device=DEVICE):
    C = shape[-1]
    x = (torch.randn(shape) * 2 + 0.7).to(dtype=dtype, device=device)  # a non-zero mean
    r = torch.randn(shape).to(dtype=dtype, device=device)
    w = (1 + 0.3 * torch.randn(C)).to(dtype=dtype, device=device)
    b = (0.3 * torch.randn(C)).to(dtype=dtype, device=device)
    return x, r, w, b


def nan_like(t):
    return torch.full_like(t, float("nan"))


def check_h(h, s, w, b, eps, dtype, what=""):
    """``h`` against the float64 LayerNorm of the kernel's own ``s`` (the sum is checked apart)."""
    ref, _ = reference.add_layernorm(s.double(), w.double(), b.double(), eps)
    assert torch.isfinite(h).all(), f"{what}: unwritten (NaN) outputs"
    err = (h.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-3), f"{what}: max error {err:.3g}, max |ref| {scale:.3g}"


def check_sum(s, x, r, dtype):
    expected = x + r
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert ((s.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(s, expected)


@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add+ln"])
@pytest.mark.parametrize("shape", [(1, 50), (7, 77), (2, 3, 64)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(dtype, shape, residual, ln_launches):
    x, r, w, b = make(shape, dtype)
    out, s_out = nan_like(x), nan_like(x)
    if residual:
        h, s = LN.add_layernorm(x, w, b, 1e-5, residual=r, out=out, residual_out=s_out)
        assert s is s_out
        check_sum(s, x, r, dtype)
    else:
        h, s = LN.add_layernorm(x, w, b, 1e-5, out=out)
        assert s is x and torch.isnan(s_out).all()
    assert h is out and ln_launches.launches == 1
    check_h(h, s, w, b, 1e-5, dtype, f"{dtype} {shape}")


def test_strided_rows_in_place_and_eps(ln_launches):
    """Rows of x[:, -1] (stride T*C), s written in place into x, a large eps."""
    B, T, C = 3, 5, 40
    base, r, w, b = make((B, T, C), torch.float32)
    x = base[:, -1]  # (B, C), row stride T*C
    x_before = x.clone()
    h, s = LN.add_layernorm(x, w, b, 0.5, residual=r[:, 0], residual_out=x)
    assert s.data_ptr() == x.data_ptr()
    assert torch.equal(base[:, -1], x_before + r[:, 0]), "the sum landed in x's own rows"
    assert torch.equal(base[:, :-1], base[:, :-1]), "other rows untouched"
    check_h(h, s, w, b, 0.5, torch.float32, "strided, in place")
    assert ln_launches.launches == 1


def test_other_rows_untouched():
    x, r, w, b = make((6, 33), torch.float16)
    big_out = torch.full((6, 2, 33), 7.0, dtype=torch.float16, device=DEVICE)
    h, _ = LN.add_layernorm(x, w, b, out=big_out[:, 0])
    assert (big_out[:, 1] == 7.0).all()
    check_h(h, x, w, b, 1e-5, torch.float16, "strided out")


def test_matches_torch_layer_norm_module():
    """Same numbers as nn.LayerNorm in float32 (the model's PyTorch path)."""
    x, _, w, b = make((5, 96), torch.float32)
    ln = torch.nn.LayerNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
        expected = ln(x)
    h, _ = LN.add_layernorm(x, ln.weight.detach(), ln.bias.detach(), ln.eps)
    assert (h - expected).abs().max().item() < 1e-5


def _bad_calls():
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    cases = [
        (dict(x=x.double(), weight=w.double(), bias=b.double()), TypeError, "x must have dtype"),
        (dict(weight=w.half()), TypeError, "weight must have dtype"),
        (dict(weight=torch.ones(7)), ValueError, "weight must be a contiguous \\(8,\\)"),
        (dict(bias=torch.zeros(16)[::2]), ValueError, "bias must be a contiguous \\(8,\\)"),
        (dict(weight=torch.ones(1, 8)), ValueError, "weight must have 1 dimensions"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
        (dict(residual=torch.randn(4, 9)), ValueError, "residual must have x's shape"),
        (dict(residual=torch.randn(4, 8).half()), TypeError, "residual must have dtype"),
        (dict(residual_out=torch.empty(4, 8)), ValueError, "only written when residual is given"),
        (dict(residual=torch.randn(4, 8), residual_out=torch.empty(4, 7)), ValueError, "residual_out must have"),
        (dict(out=torch.empty(4, 7)), ValueError, "out must have x's shape"),
        (dict(out=torch.empty(1, 8).expand(4, 8)), ValueError, "out's rows overlap"),
        (dict(x=torch.randn(4, 16)[:, ::2]), ValueError, "contiguous in its last dimension"),
        (dict(x=torch.randn(3, 4, 8).transpose(0, 1)), ValueError, "cannot be viewed as rows"),
        (dict(x=torch.randn(2, LN.MAX_C + 1), weight=torch.ones(LN.MAX_C + 1), bias=torch.zeros(LN.MAX_C + 1)), ValueError, "1 <= C <= 16384"),
        (dict(x=torch.randn(4, 0), weight=torch.ones(0), bias=torch.zeros(0)), ValueError, "non-empty last dimension"),
        (dict(x=torch.tensor(1.0)), ValueError, "non-empty last dimension"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ]
    base = dict(x=x, weight=w, bias=b)
    return [pytest.param(dict(base, **over), exc, msg, id=msg[:40]) for over, exc, msg in cases]


@pytest.mark.parametrize("kwargs, exc, message", _bad_calls())
def test_bad_inputs_raise_before_launch(kwargs, exc, message, ln_launches):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=message):
        LN.add_layernorm(**kwargs)
    assert ln_launches.launches == 0


def test_overlapping_outputs_are_refused(ln_launches):
    x, r, w, b = make((4, 16), torch.float32)
    buf = torch.empty(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="out must not overlap residual_out"):
        LN.add_layernorm(x, w, b, residual=r, out=buf[:, :16], residual_out=buf[:, :16])
    flat = torch.randn(80, device=DEVICE)
    x_view, shifted = flat[:64].view(4, 16), flat[8:72].view(4, 16)  # rows shifted by half a row
    with pytest.raises(ValueError, match="out must not overlap x"):
        LN.add_layernorm(x_view, w, b, out=shifted)
    assert ln_launches.launches == 0
    # Exact aliasing is in place and allowed: h overwrites x row by row.
    x2 = x.clone()
    h, _ = LN.add_layernorm(x2, w, b, out=x2)
    check_h(h, x, w, b, 1e-5, torch.float32, "out is x")


def test_residual_on_another_device_is_refused():
    if DEVICE != "cpu":
        pytest.skip("the CPU case: a meta tensor stands for another device")
    x, r, w, b = make((2, 8), torch.float32)
    with pytest.raises(ValueError, match="residual must be on cpu"):
        LN.add_layernorm(x, w, b, residual=torch.empty(2, 8, device="meta"))


# --------------------------------------------------------------------------------------------
# add + RMSNorm (the LLaMA family; same kernel, RMS=True)
# --------------------------------------------------------------------------------------------
def check_rms_h(h, s, w, eps, dtype, what=""):
    """``h`` against the float64 RMSNorm of the kernel's own ``s``."""
    ref, _ = reference.add_rmsnorm(s.double(), w.double(), eps)
    assert torch.isfinite(h).all(), f"{what}: unwritten (NaN) outputs"
    err = (h.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-3), f"{what}: max error {err:.3g}, max |ref| {scale:.3g}"


@pytest.mark.parametrize("residual", [False, True], ids=["rms", "add+rms"])
@pytest.mark.parametrize("shape", [(1, 576), (3, 77), (2, 2, 64)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rmsnorm_matches_float64_reference(dtype, shape, residual, ln_launches):
    x, r, w, _ = make(shape, dtype)
    out, s_out = nan_like(x), nan_like(x)
    if residual:
        h, s = LN.add_rmsnorm(x, w, 1e-6, r, out=out, residual_out=s_out)  # residual by position
        assert s is s_out
        check_sum(s, x, r, dtype)
    else:
        h, s = LN.add_rmsnorm(x, w, 1e-6, out=out)
        assert s is x
    assert h is out and ln_launches.launches == 1
    check_rms_h(h, s, w, 1e-6, dtype, f"{dtype} {shape}")


def test_add_rmsnorm_defaults_strided_rows_in_place():
    """Allocated outputs, the default eps (1e-6, as LlamaRMSNorm), strided rows, s in place into x."""
    B, T, C = 3, 4, 48
    base, r, w, _ = make((B, T, C), torch.float32)
    x = base[:, -1]  # (B, C), row stride T*C
    x_before = x.clone()
    h, s = LN.add_rmsnorm(x, w, residual=r[:, 0], residual_out=x)
    assert s.data_ptr() == x.data_ptr() and h.shape == (B, C)
    assert torch.equal(base[:, -1], x_before + r[:, 0])
    check_rms_h(h, s, w, 1e-6, torch.float32, "strided, in place")
    assert launch_record()["layernorm"]["norm"] == "rmsnorm"


def _bad_rms_calls():
    x, w = torch.randn(4, 8), torch.ones(8)
    cases = [
        (dict(weight=torch.ones(7)), ValueError, "weight must be a contiguous \\(8,\\)"),
        (dict(weight=w.half()), TypeError, "weight must have dtype"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(residual=torch.randn(4, 9)), ValueError, "residual must have x's shape"),
        (dict(residual_out=torch.empty(4, 8)), ValueError, "only written when residual is given"),
        (dict(out=torch.empty(4, 7)), ValueError, "out must have x's shape"),
        (dict(x=torch.randn(2, LN.MAX_C + 1), weight=torch.ones(LN.MAX_C + 1)), ValueError, "add_rmsnorm supports 1 <= C"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ]
    base = dict(x=x, weight=w)
    return [pytest.param(dict(base, **over), exc, msg, id=msg[:40]) for over, exc, msg in cases]


@pytest.mark.parametrize("kwargs, exc, message", _bad_rms_calls())
def test_add_rmsnorm_bad_inputs_raise_before_launch(kwargs, exc, message, ln_launches):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=message):
        LN.add_rmsnorm(**kwargs)
    assert ln_launches.launches == 0


# --------------------------------------------------------------------------------------------
# sm_90 compile check (subprocess without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------------
def _compile_worker() -> None:
    from fastgpt.kernels.utils import compile_for_hopper

    kernel = LN._add_layernorm_kernel
    results = []
    for dt, block_c, residual, rms in json.loads(sys.stdin.read()):
        constexprs = dict(HAS_RESIDUAL=residual, BLOCK_C=block_c, USE_PDL=True, RMS=rms)
        signature = {
            n: ("constexpr" if n in constexprs else "*" + dt if n.endswith("_ptr") else "fp32" if n == "eps" else "i32")
            for n in kernel.arg_names
        }
        compiled = compile_for_hopper(kernel, signature, constexprs, LN.layernorm_num_warps(block_c), 1)
        ptx = compiled.asm["ptx"]
        results.append(dict(spec=[dt, block_c, residual, rms], shared=compiled.metadata.shared,
                            spills=spill_bytes(compiled.asm["cubin"]),
                            pdl=["griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx]))
    print(json.dumps(results))


def test_kernel_compiles_for_sm90():
    """GPT-2's widths (1024 and 2048 slots), the smallest and the largest row, each dtype; RMSNorm
    at the LLaMA family's widths (576 ... 4096 features: 1024 ... 4096 slots) and the largest row."""
    specs = [["fp16", 1024, True, False], ["bf16", 2048, True, False], ["fp32", 64, False, False], ["fp32", LN.MAX_C, True, False]]
    specs += [["bf16", 1024, True, True], ["fp16", 2048, False, True], ["bf16", 4096, True, True], ["fp32", LN.MAX_C, True, True]]
    results = run_compile_workers("test_layernorm", specs, n_workers=2)
    results.sort(key=lambda r: specs.index(r["spec"]))
    assert [r["spec"] for r in results] == specs
    for r in results:
        assert r["shared"] <= H100_SHARED_MEMORY_BYTES, r
        assert r["spills"] == 0, f"{r['spec']}: {r['spills']} B of register spills"
        assert r["pdl"] == [True, True], f"{r['spec']}: griddepcontrol.wait / launch_dependents missing"


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64, 1000])
@pytest.mark.parametrize("C", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt2_widths_cuda(dtype, C, M):
    x, r, w, b = make((M, C), dtype)
    out, s_out = nan_like(x), nan_like(x)
    h, s = LN.add_layernorm(x, w, b, 1e-5, residual=r, out=out, residual_out=s_out)
    torch.cuda.synchronize()
    assert torch.equal(s, x + r), "the GPU rounds the sum to nearest, like PyTorch"
    check_h(h, s, w, b, 1e-5, dtype, f"{dtype} C={C} M={M}")
    h2, _ = LN.add_layernorm(x, w, b, 1e-5, out=nan_like(x))
    check_h(h2, x, w, b, 1e-5, dtype, f"{dtype} C={C} M={M}, no residual")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64, 1000])
@pytest.mark.parametrize("C", [576, 896, 2048, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rmsnorm_llama_widths_cuda(dtype, C, M):
    x, r, w, _ = make((M, C), dtype)
    out, s_out = nan_like(x), nan_like(x)
    h, s = LN.add_rmsnorm(x, w, 1e-6, residual=r, out=out, residual_out=s_out)
    torch.cuda.synchronize()
    assert torch.equal(s, x + r)
    check_rms_h(h, s, w, 1e-6, dtype, f"{dtype} C={C} M={M}")
