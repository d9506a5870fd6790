"""Shared helpers of the attention kernel tests (test_attention_prefill.py, test_attention_decode.py).

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

import pytest
import torch

from fastgpt import reference
from fastgpt.kernels import attention_decode as AD
from fastgpt.kernels import attention_prefill as AP
from tests.kernel_helpers import spill_bytes

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
#: dtype -> (relative-norm tolerance, atol, rtol)
TOL = {F32: (1e-3, 1e-4, 1e-3), F16: (1e-2, 2e-3, 5e-3), BF16: (1e-2, 1e-2, 1.6e-2)}

#: Every attention kernel, by name -> the module that holds it.
KERNELS = {"_prefill_kernel": AP, "_decode_split_kernel": AD, "_decode_combine_kernel": AD}


#: Bad ``rope`` arguments for a head_dim-64 call (name, mutation of the call's keyword arguments,
#: exception, message): the shared launcher check, the same for prefill and decode.
ROPE_BAD = [
    ("rope of head_dim length", lambda a: a.update(rope=torch.ones(64, device=DEVICE)), ValueError, r"rope must be the contiguous \(32,\)"),
    ("rope float16", lambda a: a.update(rope=torch.ones(32, dtype=F16, device=DEVICE)), TypeError, "rope must have dtype"),
    ("rope 2-D", lambda a: a.update(rope=torch.ones(1, 32, device=DEVICE)), ValueError, "rope must have 1 dimensions"),
    ("rope strided", lambda a: a.update(rope=torch.ones(64, device=DEVICE)[::2]), ValueError, "rope must be the contiguous"),
    ("rope not a tensor", lambda a: a.update(rope=[1.0] * 32), TypeError, "rope must be a torch.Tensor"),
]  # fmt: skip


def cuda_case(*values):
    return pytest.param(*values, marks=pytest.mark.cuda)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def launches():
    """Count the launches of each attention kernel (an instance ``run`` shadowing the class's)."""
    counts = collections.Counter()
    patched = []
    for name, module in KERNELS.items():
        kernel = getattr(module, name)
        original = kernel.run

        def spy(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        kernel.run = spy
        patched.append(kernel)
    yield counts
    for kernel in patched:
        # Not monkeypatch: its undo would leave the bound method behind as an instance attribute,
        # hiding any later class-level wrapper (benchmarks.launch_count wraps the class's run).
        del kernel.run


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


def prefill_reference(q, k, v, S_max: int, row_start, rope=None) -> torch.Tensor:
    """float64 :func:`reference.attention` of a prefill (cache slots ``[0, T)``); ``k, v`` may have
    fewer heads than ``q`` (grouped-query attention)."""
    return prefill_reference_and_cache(q, k, v, S_max, row_start, rope)[0]


def prefill_reference_and_cache(q, k, v, S_max: int, row_start, rope=None):
    """``(out, k_cache, v_cache)`` of :func:`reference.attention` in float64 on zeroed ``(B, H_kv,
    S_max, D)`` caches (with ``rope``: the cache holds the rotated keys)."""
    B, T, H, D = q.shape
    kc = torch.zeros(B, k.shape[2], S_max, D, dtype=torch.float64, device=q.device)
    vc = torch.zeros_like(kc)
    out = reference.attention(q.double(), k.double(), v.double(), kc, vc, 0, row_start, rope=rope)
    return out, kc, vc


def gqa_qkv(B: int, T: int, H: int, H_kv: int, D: int, dtype, device=DEVICE):
    """q (B, T, H, D) and k, v (B, T, H_kv, D): views of one fused (B, T, (H + 2 H_kv) D) projection,
    as a grouped-query model's QKV projection makes them."""
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, device=device, dtype=torch.float32).to(dtype)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
    assert q.stride(1) == (H + 2 * H_kv) * D and k.stride(-1) == 1  # not contiguous
    return q, k, v


def rope_frequencies(D: int, device=DEVICE, theta: float = 10000.0) -> torch.Tensor:
    """(D/2,) float32 rotary inverse frequencies: Hugging Face's default ``theta ** (-2i / D)``
    (from 1 rad per position down to ~1/theta), each jittered by a random factor in [0.5, 1.5)."""
    base = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    return (base * (0.5 + torch.rand(D // 2, dtype=torch.float64))).to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# sm_90 compilation (subprocess workers, see tests.kernel_helpers.run_compile_workers)
# --------------------------------------------------------------------------------------------
#: Pointer arguments of the attention kernels that are not of the q/k/v dtype.
_POINTER_TYPES = {
    "rs_ptr": "*i32", "pos_ptr": "*i32", "freq_ptr": "*fp32", "rope_ptr": "*fp32", "o_part_ptr": "*fp32",
    "m_part_ptr": "*fp32", "l_part_ptr": "*fp32",
}  # fmt: skip


def kernel_signature(kernel, constexprs: dict, dt: str, *, aligned: bool = False) -> tuple[dict, dict]:
    """``(signature, attrs)`` of an attention kernel for ``triton.compile``: constexprs, pointers
    (``dt`` tensors unless :data:`_POINTER_TYPES` says otherwise), ``qk_scale`` float32, the rest
    int32. ``aligned``: pointers and ``stride_*`` marked 16-divisible, as Triton specialises them
    at a real launch of 16-byte aligned tensors (what lets it vectorise and pipeline the loads)."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES.get(name, "*" + dt)
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if aligned and name not in constexprs and (name.endswith("_ptr") or name.startswith("stride_")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile_worker() -> None:
    """Subprocess entry: compile the specs read as JSON from stdin for sm_90, print JSON results.

    Runs without TRITON_INTERPRET so that the kernels and their @triton.jit helpers are real
    JITFunctions (the interpreter's wrappers cannot be compiled).
    """
    from fastgpt.kernels.utils import compile_for_hopper

    kernels = {"prefill": AP._prefill_kernel}  # the decode kernels compile in test_attention_decode.py
    results = []
    for kind, dt, head_dim, cfg in json.loads(sys.stdin.read()):
        kernel = kernels[kind]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        constexprs = {"HEAD_DIM": head_dim, **meta}
        if kind == "prefill":
            constexprs.update(IEEE=dt == "fp32", UPCAST=False)
            constexprs.setdefault("GROUP", 1)  # grouped-query heads and rope: spec'd in the config dict
            constexprs.setdefault("ROPE", False)
        signature, attrs = kernel_signature(kernel, constexprs, dt, aligned=True)
        # Aligned as at a real launch (16-byte tensors): the kernel that runs, vectorised and pipelined.
        compiled = compile_for_hopper(kernel, signature, constexprs, cfg["num_warps"], cfg["num_stages"], attrs)
        ptx = compiled.asm["ptx"]
        results.append(
            {"spec": [kind, dt, head_dim, cfg], "shared": compiled.metadata.shared, "mma": "mma" in ptx,
             "ptx_len": len(ptx), "spills": spill_bytes(compiled.asm["cubin"]),
             "pdl": ["griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx]}
        )
    print(json.dumps(results))




def check_compiled(results) -> None:
    """Prefill configs: shared memory within an H100's, 16-bit dots on tensor cores, float32 IEEE, no spills."""
    from fastgpt.kernels.utils import H100_SHARED_MEMORY_BYTES

    for r in results:
        kind, dt, head_dim, cfg = r["spec"]
        assert r["shared"] <= H100_SHARED_MEMORY_BYTES, f"{r['spec']} needs {r['shared']} B of shared memory"
        assert r["spills"] == 0, f"{r['spec']} spills {r['spills']} B of registers to local memory"
        if kind == "prefill":
            # 16-bit dots must use the tensor cores; float32 must honour IEEE (no TF32 MMA).
            assert r["mma"] == (dt != "fp32"), r["spec"]
