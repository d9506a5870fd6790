"""The smoke stage of ``make gpu-check``: is the device sane, and does each kernel compute what its
PyTorch reference computes, once, on GPT-2 shapes?

``python -m benchmarks.smoke`` records, one JSON line per check (``benchmarks.gpu_check.record``):
the device, driver, torch / triton / CUDA versions and the measured copy bandwidth; then each
kernel against :mod:`fastgpt.reference` on fresh random inputs with its output poisoned (NaN)
first -- prefill attention, decode attention with several splits, the GEMV variants, LayerNorm,
the fused sampler (greedy rows exact, sampled tokens inside the kept set, rows with NaN / +-inf
logits never out of range); the time of each (median µs, L2 flushed between calls on a GPU) and
its bytes / time in GB/s; finally 32 steps of CUDA-graph replay against eager decoding, with the
captured graph's node count.

``python -m benchmarks.smoke --build`` is the ``build`` stage: build the top-k extension, FAIL
(exit 2) unless it has a kernel for this device, then check the top-k op the same way.

Without a GPU (the dry run, ``GPU_CHECK_DRY_RUN=1``) the same checks run on tiny shapes on the CPU
under the Triton interpreter, with the graph replay emulated.

The kernels are reached through :data:`KERNELS` only, so a renamed module or function is a
one-line edit there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from benchmarks.gpu_check_log import record  # noqa: E402

#: check name -> (module, function): the kernel APIs under test (KERN's C4 renames go here).
KERNELS = {
    "prefill": ("fastgpt.kernels.attention_prefill", "prefill_attention"),
    "decode": ("fastgpt.kernels.attention_decode", "decode_attention"),
    "decode_workspace": ("fastgpt.kernels.attention_decode", "decode_workspace"),
    "linear": ("fastgpt.kernels.linear", "linear"),
    "add_layernorm": ("fastgpt.kernels.layernorm", "add_layernorm"),
    "sample": ("fastgpt.kernels.sampling", "sample"),
    "sampling_workspace": ("fastgpt.kernels.sampling", "sampling_workspace"),
    "topk": ("fastgpt.kernels.topk", "topk"),
    "topk_backend": ("fastgpt.kernels.topk", "topk_backend"),
}


def kernel(name: str):
    module, function = KERNELS[name]
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Shapes:
    """The sizes the checks run at: GPT-2 small on a GPU, tiny under the interpreter."""

    batch: int  # prefill / decode batch
    seq: int  # prefill tokens
    max_len: int  # KV cache slots
    n_head: int
    head_dim: int
    n_embd: int
    vocab: int
    sample_batch: int
    ln_rows: int
    n_split: int  # decode splits forced (the default chooser's count is checked too)
    graph_model: dict  # GPTConfig fields of the graph-replay model
    dtype: torch.dtype


GPU_SHAPES = Shapes(batch=2, seq=128, max_len=1024, n_head=12, head_dim=64, n_embd=768, vocab=50257,
                    sample_batch=64, ln_rows=64, n_split=4,
                    graph_model=dict(n_embd=768, n_head=12, n_layer=12), dtype=torch.float16)  # fmt: skip
TINY_SHAPES = Shapes(batch=2, seq=8, max_len=32, n_head=2, head_dim=64, n_embd=128, vocab=300,
                     sample_batch=4, ln_rows=4, n_split=3,
                     graph_model=dict(n_embd=128, n_head=2, n_layer=1, vocab_size=257, n_positions=64),
                     dtype=torch.float32)  # fmt: skip
#: ‖out − ref‖ / ‖ref‖ allowed, by dtype (METHOD: fp32 far under 1e-3, fp16 operands ~1e-3).
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAPH_STEPS = 32


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def time_us(fn, device: torch.device) -> float:
    """Median µs of ``fn()``: on a GPU with the L2 cache flushed before each call
    (``triton.testing.do_bench``); on the CPU one call (the interpreter has nothing to warm up and
    is slow: the number only proves the plumbing)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=5, rep=20, return_mode="median")
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere (an unwritten element) gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def report(stage: str, check: str, fn, device: torch.device) -> bool:
    """Run one check function (it returns its fields and its timed callable), record one row."""
    start = time.perf_counter()
    try:
        fields = fn()
        timed = fields.pop("timed", None)
        moved = fields.pop("bytes", None)
        if timed is not None:
            us = time_us(timed, device)
            fields["us"] = round(us, 2)
            if moved:
                fields["gbs"] = round(moved / (us * 1e-6) / 1e9, 1)
                fields["bytes"] = moved
    except Exception as exc:  # a failing check is a result, and the next check still runs
        fields = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()  # an asynchronous fault belongs to this check
        except Exception as exc:
            fields.update(ok=False, error=f"after the check: {type(exc).__name__}: {exc}"[:500])
    record(stage, "check", check=check, seconds=round(time.perf_counter() - start, 2), **fields)
    return bool(fields.get("ok"))


# --------------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------------
def device_facts(device: torch.device) -> dict:
    from benchmarks.common import device_name, measure_copy_bandwidth_gbs, versions

    facts = dict(ok=True, device=device_name(device), versions=versions())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2**30, 1), driver=_driver_version(),
                     copy_bandwidth_gbs=round(measure_copy_bandwidth_gbs(device), 1))  # fmt: skip
    return facts


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# The kernel checks: each returns ok, the error, its tolerance, and a callable to time
# --------------------------------------------------------------------------------------------
def _qkv(s: Shapes, T: int, device, dtype):
    return [torch.randn(s.batch, T, s.n_head, s.head_dim, device=device, dtype=dtype) for _ in range(3)]


def check_prefill(s: Shapes, device) -> dict:
    from fastgpt import reference

    dtype = s.dtype
    q, k, v = _qkv(s, s.seq, device, dtype)
    cache_shape = (s.batch, s.n_head, s.max_len, s.head_dim)
    k_cache, v_cache = poisoned(cache_shape, dtype, device), poisoned(cache_shape, dtype, device)
    row_start = torch.zeros(s.batch, dtype=torch.int32, device=device)
    row_start[-1] = 3  # one left-padded row
    out = poisoned(q.shape, dtype, device)
    prefill = kernel("prefill")
    prefill(q, k, v, k_cache, v_cache, row_start, out=out)
    ref_k = torch.zeros(cache_shape, dtype=torch.float64, device=device)
    ref_v = torch.zeros_like(ref_k)
    ref = reference.attention(q.double(), k.double(), v.double(), ref_k, ref_v, 0, row_start)
    err = rel_err(out, ref)
    cache_ok = torch.equal(k_cache[:, :, : s.seq], k.transpose(1, 2)) and torch.equal(v_cache[:, :, : s.seq], v.transpose(1, 2))
    tol = REL_TOL[dtype]
    return dict(ok=err <= tol and cache_ok, rel_err=err, tol=tol, cache_written=cache_ok,
                shape=dict(B=s.batch, T=s.seq, H=s.n_head, D=s.head_dim), dtype=str(dtype),
                timed=lambda: prefill(q, k, v, k_cache, v_cache, row_start, out=out),
                bytes=nbytes(q, k, v, out) + 2 * nbytes(k))  # fmt: skip


def check_decode(s: Shapes, device, n_split: int | None) -> dict:
    from fastgpt import reference

    dtype = s.dtype
    pos = s.max_len - 5  # a long context: many slots per split
    cache_shape = (s.batch, s.n_head, s.max_len, s.head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    ref_k, ref_v = k_cache.double().clone(), v_cache.double().clone()
    q, k, v = _qkv(s, 1, device, dtype)
    cache_pos = torch.tensor([pos], dtype=torch.int32, device=device)
    row_start = torch.zeros(s.batch, dtype=torch.int32, device=device)
    workspace = kernel("decode_workspace")(s.batch, s.n_head, s.head_dim, s.max_len, device, n_split=n_split)
    out = poisoned(q.shape, dtype, device)
    decode = kernel("decode")
    decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out=out)
    ref = reference.attention(q.double(), k.double(), v.double(), ref_k, ref_v, pos, None)
    err = rel_err(out, ref)
    tol = REL_TOL[dtype]
    live = 2 * s.batch * s.n_head * (pos + 1) * s.head_dim * k_cache.element_size()
    return dict(ok=err <= tol, rel_err=err, tol=tol, n_split=workspace["attn_o"].shape[2], context=pos + 1,
                dtype=str(dtype), timed=lambda: decode(q, k, v, k_cache, v_cache, cache_pos, row_start, workspace, out=out),
                bytes=live + nbytes(q, out))  # fmt: skip


#: GEMV variants at decode (M rows): the four GPT-2 layer projections with their fused epilogues.
def gemv_variants(C: int) -> list[dict]:
    return [
        dict(name="qkv+ln", M=1, N=3 * C, K=C, ln=True, activation=None, residual=False),
        dict(name="fc+ln+gelu", M=1, N=4 * C, K=C, ln=True, activation="gelu_tanh", residual=False),
        dict(name="proj+residual", M=1, N=C, K=4 * C, ln=False, activation=None, residual=True),
        dict(name="attn_proj+residual-m8", M=8, N=C, K=C, ln=False, activation=None, residual=True),
    ]


def check_linear(s: Shapes, device, variant: dict) -> dict:
    from fastgpt import reference

    dtype, M, N, K = s.dtype, variant["M"], variant["N"], variant["K"]
    x = torch.randn(M, K, device=device, dtype=dtype)
    weight = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
    bias = torch.randn(N, device=device, dtype=dtype) * 0.1
    residual = torch.randn(M, N, device=device, dtype=dtype) if variant["residual"] else None
    ln = (torch.rand(K, device=device, dtype=dtype) + 0.5, torch.randn(K, device=device, dtype=dtype) * 0.1) if variant["ln"] else (None, None)
    kwargs = dict(activation=variant["activation"], residual=residual, ln_weight=ln[0], ln_bias=ln[1])
    out = poisoned((M, N), dtype, device)
    linear = kernel("linear")
    linear(x, weight, bias, out=out, **kwargs)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.linear(x.double(), weight.double(), bias.double(), activation=variant["activation"], residual=up(residual),
                           ln_weight=up(ln[0]), ln_bias=up(ln[1]))  # fmt: skip
    err = rel_err(out, ref)
    tol = REL_TOL[dtype]
    return dict(ok=err <= tol, rel_err=err, tol=tol, M=M, N=N, K=K, dtype=str(dtype),
                timed=lambda: linear(x, weight, bias, out=out, **kwargs),
                bytes=nbytes(x, weight, bias, residual, out, *ln))  # fmt: skip


def check_layernorm(s: Shapes, device) -> dict:
    from fastgpt import reference

    dtype, C = s.dtype, s.n_embd
    x = torch.randn(s.ln_rows, C, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight, bias = torch.rand(C, device=device, dtype=dtype) + 0.5, torch.randn(C, device=device, dtype=dtype) * 0.1
    out, residual_out = poisoned(x.shape, dtype, device), poisoned(x.shape, dtype, device)
    add_layernorm = kernel("add_layernorm")
    add_layernorm(x, weight, bias, 1e-5, residual=residual, out=out, residual_out=residual_out)
    ref_h, ref_s = reference.add_layernorm(x.double(), weight.double(), bias.double(), 1e-5, residual.double())
    err = max(rel_err(out, ref_h), rel_err(residual_out, ref_s))
    tol = REL_TOL[dtype]
    return dict(ok=err <= tol, rel_err=err, tol=tol, rows=s.ln_rows, C=C, dtype=str(dtype),
                timed=lambda: add_layernorm(x, weight, bias, 1e-5, residual=residual, out=out, residual_out=residual_out),
                bytes=nbytes(x, residual, weight, bias, out, residual_out))  # fmt: skip


def _sampler_inputs(s: Shapes, device, logits: torch.Tensor, temperature: list[float], top_k: int = 50, top_p: float = 0.9):
    B = logits.shape[0]
    return dict(
        logits=logits,
        temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
        top_k=torch.full((B,), top_k, dtype=torch.int32, device=device),
        top_p=torch.full((B,), top_p, dtype=torch.float32, device=device),
        min_p=torch.zeros(B, dtype=torch.float32, device=device),
        seed=torch.tensor([1234], dtype=torch.int64, device=device),
        step=torch.tensor([7], dtype=torch.int64, device=device),
    )


def check_sampler(s: Shapes, device) -> dict:
    """Half the rows greedy (must equal torch.argmax), half sampling with top-k / top-p (the token
    must have non-zero probability under the reference distribution)."""
    from fastgpt import reference

    B, V = s.sample_batch, s.vocab
    logits = torch.randn(B, V, device=device, dtype=torch.float32) * 3
    temperature = [0.0 if b % 2 == 0 else 0.8 for b in range(B)]
    args = _sampler_inputs(s, device, logits, temperature)
    sample = kernel("sample")
    workspace = kernel("sampling_workspace")(B, V, device)
    out = torch.full((B,), -1, dtype=torch.int64, device=device)
    sample(**args, out=out, workspace=workspace)
    greedy = out[0::2] == logits[0::2].argmax(dim=-1)
    probs = reference.sampling_probs(logits.double(), args["temperature"], args["top_k"], args["top_p"], args["min_p"])
    in_range = bool(((out >= 0) & (out < V)).all())
    kept = bool(probs[torch.arange(B, device=device), out.clamp(0, V - 1)][1::2].gt(0).all()) if in_range else False
    return dict(ok=bool(greedy.all()) and in_range and kept, greedy_exact=bool(greedy.all()), in_range=in_range,
                sampled_in_kept_set=kept, B=B, V=V, timed=lambda: sample(**args, out=out, workspace=workspace),
                bytes=nbytes(logits, out))  # fmt: skip


def check_sampler_nonfinite(s: Shapes, device) -> dict:
    """Rows of NaN / +inf / -inf logits (whole rows and scattered): every token in range, greedy
    rows as torch.argmax, and, where the kernel has the status flag (contract C1), the flags."""
    B, V = 8, s.vocab
    logits = torch.randn(B, V, device=device, dtype=torch.float32)
    logits[0] = float("nan")  # whole row NaN (sampling)
    logits[1, ::3] = float("nan")  # scattered NaN (sampling)
    logits[2, 5] = float("inf")  # +inf (sampling)
    logits[3] = float("-inf")  # every token impossible (sampling)
    logits[4] = float("nan")  # whole row NaN (greedy)
    logits[5, V // 2] = float("nan")  # one NaN (greedy: NaN is the max)
    logits[6, 1] = float("inf")  # +inf (greedy)
    temperature = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    args = _sampler_inputs(s, device, logits, temperature, top_k=0, top_p=1.0)
    sample = kernel("sample")
    out = torch.full((B,), -1, dtype=torch.int64, device=device)
    kwargs = {}
    has_status = "status" in inspect.signature(sample).parameters
    if has_status:
        kwargs["status"] = torch.zeros(B, 2, dtype=torch.int32, device=device)
    sample(**args, out=out, workspace=kernel("sampling_workspace")(B, V, device), **kwargs)
    in_range = bool(((out >= 0) & (out < V)).all())
    greedy_rows = [4, 5, 6]
    greedy = bool((out[greedy_rows] == logits[greedy_rows].argmax(dim=-1)).all())
    fields = dict(in_range=in_range, greedy_as_argmax=greedy, tokens=out.tolist(), status_flag=has_status)
    ok = in_range and greedy
    if has_status:
        flags = kwargs["status"][:, 0].tolist()
        expected = {0: 1, 1: 1, 2: 2, 3: 4}  # C1: NaN -> 1, +inf -> 2, nothing possible -> 4
        flags_ok = all(flags[r] & bit for r, bit in expected.items()) and all(flags[r] == 0 for r in (4, 5, 6, 7))
        fields.update(flags=flags, flags_ok=flags_ok)
        ok = ok and flags_ok
    return dict(ok=ok, **fields)


def check_topk(s: Shapes, device) -> dict:
    from fastgpt import reference

    backend = kernel("topk_backend")(device)
    expected = f"{device.type}-ext"
    topk = kernel("topk")
    results = {}
    for dtype, k in ((torch.float32, 50), (torch.float16, 256)):
        x = torch.randn(4, s.vocab, device=device).to(dtype)
        x[0, :10] = x[0, 10]  # ties: the lower index first
        values, indices = topk(x, min(k, s.vocab))
        ref_values, ref_indices = reference.topk(x, min(k, s.vocab))
        results[str(dtype)] = bool(torch.equal(indices, ref_indices) and torch.equal(values, ref_values))
    x = torch.randn(64, s.vocab, device=device, dtype=torch.float16)
    return dict(ok=backend == expected and all(results.values()), backend=backend, expected_backend=expected,
                exact=results, timed=lambda: topk(x, 50), bytes=nbytes(x))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Graph replay against eager
# --------------------------------------------------------------------------------------------
class _KeptGraph(torch.cuda.CUDAGraph):
    """A CUDAGraph that keeps its cudaGraph_t after capture (``keep_graph=True``), so its nodes can
    be counted; replay instantiates it on first use. Only the smoke check's captures use it."""

    def __new__(cls, keep_graph: bool = True):
        return super().__new__(cls, True)


def _can_keep_graph() -> bool:
    try:
        return "keep_graph" in inspect.signature(torch.cuda.CUDAGraph.__new__).parameters
    except (TypeError, ValueError):
        return False


_CAN_KEEP_GRAPH = _can_keep_graph()


def graph_node_count(model) -> int | None:
    """Nodes of the decode graph captured for ``model`` (``cudaGraphGetNodes``), None if unknown."""
    import ctypes

    from fastgpt import cuda_graph

    graphs = cuda_graph.GraphCache.of(model, create=False)
    entries = list(graphs.entries.values()) if graphs is not None else []
    graph = getattr(entries[-1], "_graph", None) if entries else None
    if graph is None:
        return None
    for lib in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            cudart = ctypes.CDLL(lib)  # the copy torch already loaded (matched by soname)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_size_t(0)
    rc = cudart.cudaGraphGetNodes(ctypes.c_void_p(graph.raw_cuda_graph()), None, ctypes.byref(count))
    return int(count.value) if rc == 0 else None


@contextlib.contextmanager
def _emulated_graphs():
    import pytest

    from tests.helpers import emulate_graph_replay

    with pytest.MonkeyPatch.context() as patch:
        emulate_graph_replay(patch)
        yield


def check_graph_replay(s: Shapes, device) -> dict:
    """32 greedy steps with the decode step as a CUDA graph (emulated on the CPU) equal to eager."""
    from benchmarks.common import env_override
    from fastgpt import GPT, GPTConfig
    from fastgpt import clear_graph_cache, last_generate_stats

    model = GPT.from_config(GPTConfig(**s.graph_model), dtype=s.dtype, device=device, seed=0)
    with torch.no_grad():  # wider than GPT-2's init, so greedy decoding does not repeat one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    on_gpu = device.type == "cuda"
    graph_mode = "1" if on_gpu else "emulated"
    clear_graph_cache()
    with env_override(FASTGPT_CUDA_GRAPH="0"):
        eager = model.generate(ids, GRAPH_STEPS)
    # Keep the captured cudaGraph_t (to count its nodes) where this torch can (keep_graph, 2.8+).
    keep = mock.patch.object(torch.cuda, "CUDAGraph", _KeptGraph) if _CAN_KEEP_GRAPH else contextlib.nullcontext()
    # On the CPU (the dry run) the capture/replay is replaced the way the tests do it: the same
    # persistent state and bookkeeping, each replay an eager call of the captured step.
    emulate = contextlib.nullcontext() if on_gpu else _emulated_graphs()
    with env_override(FASTGPT_CUDA_GRAPH="1"), keep, emulate:
        graphed = model.generate(ids, GRAPH_STEPS)
        stats = last_generate_stats()
        try:
            nodes = graph_node_count(model) if device.type == "cuda" else None
        except (RuntimeError, AttributeError, OSError) as exc:
            nodes = f"unknown ({type(exc).__name__}: {exc})"[:200]
        timed = lambda: model.generate(ids, GRAPH_STEPS)  # noqa: E731
        us = time_us(timed, device) if device.type == "cuda" else None  # a whole call: prefill + 32 steps
    same = torch.equal(eager, graphed)
    clear_graph_cache()
    return dict(ok=same and stats.get("path") == "graph", tokens_equal=same, path=stats.get("path"),
                reason=stats.get("reason"), graph_nodes=nodes, steps=GRAPH_STEPS, graph_mode=graph_mode,
                distinct_tokens=int(eager[:, ids.shape[1]:].unique().numel()),
                generate_us=round(us, 1) if us else None)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def smoke(device: torch.device, s: Shapes) -> int:
    stage = "smoke"
    report(stage, "device", lambda: device_facts(device), device)
    torch.manual_seed(0)
    # Cheapest compiles first: the autotuned attention kernels compile several configurations
    # each on a cold cache, and a stage cut at its limit should have done the most checks.
    checks = [
        *((f"gemv-{v['name']}", (lambda v=v: check_linear(s, device, v))) for v in gemv_variants(s.n_embd)),
        ("layernorm", lambda: check_layernorm(s, device)),
        ("sampler", lambda: check_sampler(s, device)),
        (f"decode-split{s.n_split}", lambda: check_decode(s, device, s.n_split)),
        ("decode-default-splits", lambda: check_decode(s, device, None)),
        ("prefill", lambda: check_prefill(s, device)),
        ("graph-replay", lambda: check_graph_replay(s, device)),
        # Last: on a kernel with the out-of-bounds bug of issue 10 this may crash the process.
        ("sampler-nonfinite", lambda: check_sampler_nonfinite(s, device)),
    ]
    failed = [name for name, fn in checks if not report(stage, name, fn, device)]
    return 1 if failed else 0


def build(device: torch.device, s: Shapes) -> int:
    """Build the top-k extension; fail unless it has a kernel for ``device``; check the op."""
    stage = "build"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the build's fallback warning says why
        warnings.simplefilter("always")
        backend = kernel("topk_backend")(device)
    expected = f"{device.type}-ext"
    ok = backend == expected
    why = "; ".join(str(w.message) for w in caught)[-2000:]
    record(stage, "check", check="topk-extension", ok=ok, backend=backend, expected_backend=expected,
           seconds=round(time.perf_counter() - start, 1), warnings=why or None,
           error=None if ok else f"the top-k extension has no {device.type} kernel (backend {backend!r}): {why or 'no warning'}")  # fmt: skip
    if not ok:
        print(f"build: FAILED: the top-k extension was not built for {device} (backend {backend!r})", file=sys.stderr)
        return 2
    return 0 if report(stage, "topk", lambda: check_topk(s, device), device) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the smoke stage of make gpu-check")
    parser.add_argument("--build", action="store_true", help="the build stage: the top-k extension, then the top-k check")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = GPU_SHAPES if device.type == "cuda" else TINY_SHAPES
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only spin on a busy machine
    return build(device, shapes) if args.build else smoke(device, shapes)


if __name__ == "__main__":
    sys.exit(main())
