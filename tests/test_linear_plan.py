"""Tests of the per-shape cuBLAS-vs-Triton choice (kernels/linear_plan.py).

On the CPU the plan is the interpreted GEMV for decode-sized M and cuBLAS beyond; the GPU-only
measurement runs on the CPU with stand-ins for CUDA events (every candidate timed, a config whose
output disagrees with cuBLAS dropped with a warning); on a GPU the measured plans are cached.
The kernels themselves are tested in test_linear.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from fastgpt.kernels import linear as KL
from fastgpt.kernels import linear_plan as LP
from tests.test_linear import assert_close, make_inputs, reference64

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU plan; CUDA measures (see test_plan_measures_and_caches_cuda)")
def test_plan_on_cpu_uses_the_kernel_for_small_m_and_cublas_for_prefill(monkeypatch):
    monkeypatch.delenv("FASTGPT_LINEAR", raising=False)
    inp = make_inputs(4, 20, 30, torch.float32)
    p = LP.plan(inp["x"], inp["weight"], inp["bias"])
    assert p.impl == "triton" and p.config == KL.default_config(4, 20, 30, "cpu")
    big = torch.randn(17, 30)
    assert LP.plan(big, inp["weight"]).impl == "cublas"
    monkeypatch.setenv("FASTGPT_LINEAR", "cublas")
    assert LP.plan(inp["x"], inp["weight"]).impl == "cublas"
    monkeypatch.setenv("FASTGPT_LINEAR", "tune")
    assert LP.plan(inp["x"], inp["weight"]).impl == "triton"  # the CPU has nothing to measure
    monkeypatch.setenv("FASTGPT_LINEAR", "fastest")
    with pytest.raises(ValueError, match="FASTGPT_LINEAR must be one of"):
        LP.plan(inp["x"], inp["weight"])


class _FakeEvent:
    """torch.cuda.Event on the CPU: wall-clock stamps (enough to drive LP._measure's logic)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU-only measurement on the CPU")
def test_measurement_times_candidates_and_discards_a_wrong_config(monkeypatch):
    """LP._measure (normally CUDA only) with CPU stand-ins for events and device properties: every
    candidate is timed, a config whose output disagrees with cuBLAS is dropped with a warning."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=1 << 16))
    monkeypatch.setattr(LP, "_MEASURE_REPS", 2)
    inp = make_inputs(1, 20, 48, torch.float32)
    cands = KL.candidate_configs(1, 20, 48, "cpu")
    broken = cands[0]
    real_linear = KL.linear

    def sometimes_wrong(*args, config=None, **kwargs):
        out = real_linear(*args, config=config, **kwargs)
        return out.mul_(1.5) if config == broken else out

    monkeypatch.setattr(LP, "linear", sometimes_wrong)
    with pytest.warns(UserWarning, match="disagrees with cuBLAS"):
        p = LP._measure(inp["x"], inp["weight"], inp["bias"], "gelu_tanh", inp["residual"], inp["ln_weight"], inp["ln_bias"], 1e-5)
    assert p.reason.startswith("measured")
    assert set(p.times_us) == {"cublas"} | {str(c) for c in cands[1:]}
    assert p.impl == ("cublas" if min(p.times_us, key=p.times_us.get) == "cublas" else "triton")
    # Every Triton config wrong: cuBLAS, and it says why.
    monkeypatch.setattr(LP, "linear", lambda *a, config=None, **k: real_linear(*a, config=config, **k).mul_(-1))
    with pytest.warns(UserWarning):
        p = LP._measure(inp["x"], inp["weight"], None, None, None, None, None, 1e-5)
    assert p.impl == "cublas" and "no Triton config" in p.reason


@pytest.mark.cuda
def test_plan_measures_and_caches_cuda(monkeypatch):
    monkeypatch.delenv("FASTGPT_LINEAR", raising=False)
    LP.clear_plans()
    for M in (1, 8):
        inp = make_inputs(M, 2304, 768, torch.float16, residual=False)
        kwargs = dict(activation=None, ln_weight=inp["ln_weight"], ln_bias=inp["ln_bias"])
        p = LP.plan(inp["x"], inp["weight"], inp["bias"], **kwargs)
        assert p.impl in ("triton", "cublas") and p.reason.startswith("measured"), p
        assert "cublas" in p.times_us and len(p.times_us) >= 2, "cuBLAS and at least one Triton config timed"
        assert LP.plan(inp["x"], inp["weight"], inp["bias"], **kwargs) is p, "cached"
        fn = KL.linear if p.impl == "triton" else KL.cublas_linear
        extra = dict(config=p.config) if p.impl == "triton" else {}
        out = fn(inp["x"], inp["weight"], inp["bias"], **kwargs, **extra)
        assert_close(out, reference64(inp, None), torch.float16, f"plan {p}")
    assert len(LP.plans()) == 2


# --------------------------------------------------------------------------------------------
# the LLaMA family: RMSNorm prologue, silu_glu epilogue
# --------------------------------------------------------------------------------------------
def test_plan_key_separates_norms_and_activations():
    inp = make_inputs(2, 20, 30, torch.float32, norm="rmsnorm")
    key = lambda **kw: LP.plan_key(inp["x"], inp["weight"], inp["bias"], ln_weight=inp["ln_weight"], **kw)  # noqa: E731
    assert key(norm="rmsnorm") != key(norm="layernorm")
    assert key(activation="silu_glu") != key(activation=None) != key(activation="gelu_tanh")
    assert key(norm="rmsnorm")[-1] == "rmsnorm"
    # Without ln_weight the norm does nothing and does not split the cache.
    no_ln = lambda norm: LP.plan_key(inp["x"], inp["weight"], norm=norm)  # noqa: E731
    assert no_ln("rmsnorm") == no_ln("layernorm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU plan; CUDA measures (see test_plan_llama_ops_cuda)")
def test_plan_on_cpu_accepts_rmsnorm_and_silu_glu(monkeypatch):
    monkeypatch.delenv("FASTGPT_LINEAR", raising=False)
    inp = make_inputs(1, 24, 40, torch.float32, norm="rmsnorm", glu=True, residual=False)
    kw = dict(activation="silu_glu", ln_weight=inp["ln_weight"], ln_eps=1e-6, norm="rmsnorm")
    p = LP.plan(inp["x"], inp["weight"], inp["bias"], **kw)
    assert p.impl == "triton" and p.config == KL.default_config(1, 24, 40, "cpu")
    out = KL.linear(inp["x"], inp["weight"], inp["bias"], config=p.config, **kw)
    assert out.shape == (1, 12)
    assert_close(out, reference64(inp, "silu_glu", ln_eps=1e-6, norm="rmsnorm"), torch.float32, "planned silu_glu")
    assert LP.plan(torch.randn(17, 40), inp["weight"], **kw).impl == "cublas"


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU-only measurement on the CPU")
def test_measurement_times_the_real_rmsnorm_silu_glu_op(monkeypatch):
    """The measured candidates run the caller's op: RMSNorm, silu_glu, an N/2-wide output."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=1 << 16))
    monkeypatch.setattr(LP, "_MEASURE_REPS", 2)
    inp = make_inputs(1, 20, 48, torch.float32, norm="rmsnorm", glu=True)
    seen = []
    real_linear, real_cublas = KL.linear, KL.cublas_linear

    def spy(real):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.append((kwargs["norm"], kwargs["activation"], tuple(out.shape)))
            return out

        return call

    monkeypatch.setattr(LP, "linear", spy(real_linear))
    monkeypatch.setattr(LP, "cublas_linear", spy(real_cublas))
    p = LP._measure(inp["x"], inp["weight"], inp["bias"], "silu_glu", inp["residual"], inp["ln_weight"], None, 1e-6, norm="rmsnorm")
    assert p.reason.startswith("measured") and "cublas" in p.times_us and len(p.times_us) >= 2
    assert seen and set(seen) == {("rmsnorm", "silu_glu", (1, 10))}


@pytest.mark.cuda
def test_plan_llama_ops_cuda(monkeypatch):
    """Llama-3.2-1B's gate_up (RMSNorm + silu_glu) and LM head (RMSNorm) measured, cached, exact."""
    monkeypatch.delenv("FASTGPT_LINEAR", raising=False)
    LP.clear_plans()
    for N, activation in ((16384, "silu_glu"), (128256, None)):
        for M in (1, 8):
            inp = make_inputs(M, N, 2048, torch.bfloat16, bias=False, residual=False, norm="rmsnorm", glu=activation is not None)
            kw = dict(activation=activation, ln_weight=inp["ln_weight"], ln_eps=1e-5, norm="rmsnorm")
            p = LP.plan(inp["x"], inp["weight"], **kw)
            assert p.reason.startswith("measured") and "cublas" in p.times_us and len(p.times_us) >= 2, p
            assert LP.plan(inp["x"], inp["weight"], **kw) is p, "cached"
            fn = KL.linear if p.impl == "triton" else KL.cublas_linear
            extra = dict(config=p.config) if p.impl == "triton" else {}
            out = fn(inp["x"], inp["weight"], **kw, **extra)
            assert_close(out, reference64(inp, activation, norm="rmsnorm"), torch.bfloat16, f"plan {p}")
    assert len(LP.plans()) == 4
