"""The per-shape choice between the fused Triton GEMV and cuBLAS for one linear op.

Per-shape choice (:func:`plan`)
-------------------------------
``plan(...)`` returns a :class:`LinearPlan`: ``"triton"`` (the GEMV of :mod:`fastgpt.kernels.linear`, with a tile config) or
``"cublas"`` (:func:`fastgpt.kernels.linear.cublas_linear`: ``F.linear``/``addmm`` with the LayerNorm or
RMSNorm as one :func:`kernels.layernorm.add_layernorm` / ``add_rmsnorm`` launch before it and the
activation / residual as torch ops after it). Plans are cached per ``(device, dtype, N, K, M
bucket, prologue, epilogue)`` with M buckets 1, 2, 4, 8, 16; the prologue is the norm (none,
``"layernorm"`` or ``"rmsnorm"``), the epilogue bias / activation (``"silu_glu"`` included: the
SwiGLU gate_up op, whose output has N/2 columns) / residual. The measurement times exactly the
op the caller will run (same norm, same activation, same output width).

* ``M > GEMV_MAX_M`` (prefill): always cuBLAS (compute-bound, cuBLAS is the right tool).
* CPU (the Triton interpreter): the GEMV with the default config, so the tests exercise it.
* CUDA: on the first eager call for a key, the candidate configs (:func:`~fastgpt.kernels.linear.candidate_configs`: two
  tiles at the heuristic split by default) and the cuBLAS path are run on the call's own tensors,
  checked against each other (a Triton config whose result disagrees with cuBLAS is discarded
  with a warning) and timed with L2 flushed between repetitions (in a decode step every weight
  comes from HBM; the flush buffer, 2 x L2, exists only during the measurement); the fastest
  wins and is kept for the life of the process (:func:`plans` lists them, :func:`clear_plans`
  forgets them). This takes ~0.1 s plus Triton's compile time (~1 s per new config) per key, once.
* ``FASTGPT_LINEAR``: ``auto`` (default) measures as above, ``tune`` measures every tile at two
  splits, ``triton`` / ``cublas`` force one side without measuring.

CUDA graphs: the measurement launches kernels, allocates and synchronises, so it must happen
before capture; the first eager call with the same shapes (the usual warm-up) resolves it. A call
during capture whose key has no plan falls back to cuBLAS (with one warning) without caching
that choice.

The measurement times on the device with its own L2-flushed loop (kernels may not import the
benchmarks' ``time_gpu``): every candidate interleaved, medians of 15 repetitions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from .linear import GEMV_MAX_M, GemvConfig, candidate_configs, cublas_linear, default_config, linear, m_bucket, output_width

__all__ = ["LinearPlan", "plan", "plan_key", "plans", "clear_plans"]


@dataclass(frozen=True)
class LinearPlan:
    """How one (shape, dtype, epilogue) runs: ``impl`` ``"triton"`` (with ``config``) or ``"cublas"``."""

    impl: str
    config: GemvConfig | None
    reason: str
    #: Median microseconds per candidate (``"cublas"`` and ``str(config)``), when measured.
    times_us: dict = field(default_factory=dict, compare=False)


_PLANS: dict[tuple, LinearPlan] = {}
_warned_capture = False


def _forced() -> str:
    choice = os.environ.get("FASTGPT_LINEAR", "auto").strip().lower() or "auto"
    if choice not in ("auto", "tune", "triton", "cublas"):
        raise ValueError(f"FASTGPT_LINEAR must be one of auto, tune, triton, cublas; got {choice!r}")
    return choice


def plan(
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
) -> LinearPlan:
    """The implementation this op should use, measured once per key on CUDA (see the module doc).

    The arguments are those of the call about to be made, with :func:`kernels.linear.linear`'s
    meaning (``norm="rmsnorm"`` with ``ln_bias`` None; ``activation="silu_glu"`` with a
    row-interleaved ``(2F, K)`` weight); the measurement runs on them; nothing is written to them.
    """
    M = x.numel() // max(1, x.shape[-1])
    N, K = weight.shape
    if M > GEMV_MAX_M or M < 1:
        return LinearPlan("cublas", None, f"M={M} > {GEMV_MAX_M}: GEMM")
    forced = _forced()
    if forced == "cublas":
        return LinearPlan("cublas", None, "FASTGPT_LINEAR=cublas")
    if forced == "triton" or x.device.type != "cuda":
        reason = "FASTGPT_LINEAR=triton" if forced == "triton" else "interpreter: default config"
        return LinearPlan("triton", default_config(M, N, K, x.device), reason)
    key = plan_key(x, weight, bias, activation=activation, residual=residual, ln_weight=ln_weight, norm=norm)
    found = _PLANS.get(key)
    if found is not None:
        return found
    if torch.cuda.is_current_stream_capturing():
        global _warned_capture
        if not _warned_capture:
            warnings.warn(
                "kernels.linear_plan: first use of a linear shape during CUDA-graph capture; using cuBLAS for it. "
                "Run the step once eagerly before capturing so that the faster kernel is measured and chosen.",
                stacklevel=2,
            )
            _warned_capture = True
        return LinearPlan("cublas", None, "unmeasured during capture")
    found = _measure(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, exhaustive=forced == "tune", norm=norm)
    _PLANS[key] = found
    return found


def plan_key(x, weight, bias=None, *, activation=None, residual=None, ln_weight=None, norm="layernorm") -> tuple:
    """The cache key of a plan: ``(device, dtype, N, K, m_bucket, bias, activation, residual, norm)``,
    ``norm`` None without ``ln_weight`` (then ``norm=`` changes nothing)."""
    M = x.numel() // max(1, x.shape[-1])
    N, K = weight.shape
    return (
        x.device, x.dtype, N, K, m_bucket(M),
        bias is not None, activation, residual is not None, norm if ln_weight is not None else None,
    )  # fmt: skip


def plans() -> dict[tuple, LinearPlan]:
    """Every measured plan: ``{plan_key(...): plan}`` (:func:`plan_key`)."""
    return dict(_PLANS)


def clear_plans() -> None:
    """Forget the measured plans (the next call of each shape measures again)."""
    _PLANS.clear()


#: Relative error (Frobenius) above which a Triton config is taken to disagree with cuBLAS. Loose
#: enough for a TF32 cuBLAS (torch.backends.cuda.matmul.allow_tf32) and half-precision rounding; a
#: wrong kernel is off by O(1).
_SELF_CHECK_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
_MEASURE_REPS = 15


def _measure(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, *, exhaustive=False, norm="layernorm") -> LinearPlan:
    """Time cuBLAS against every candidate config on these tensors; check them against each other."""
    device = x.device
    M = x.numel() // x.shape[-1]
    N, K = weight.shape
    kwargs = dict(activation=activation, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, norm=norm)
    shape = (*x.shape[:-1], output_width(N, activation))
    ref = torch.empty(shape, dtype=x.dtype, device=device)
    cublas_linear(x, weight, bias, out=ref, **kwargs)
    candidates = {"cublas": lambda o: cublas_linear(x, weight, bias, out=o, **kwargs)}
    scale = ref.float().norm().item()
    configs = candidate_configs(M, N, K, device, exhaustive=exhaustive)
    for cfg in configs:
        got = torch.empty(shape, dtype=x.dtype, device=device)
        try:
            linear(x, weight, bias, out=got, config=cfg, **kwargs)  # compiles; allocates its workspace
            torch.cuda.synchronize(device)
        except Exception as exc:  # a config the compiler or the device rejects is skipped, not fatal
            warnings.warn(f"kernels.linear_plan: config {cfg} failed for N={N} K={K} M={M}: {exc!r}; skipped", stacklevel=3)
            continue
        err = (got.float() - ref.float()).norm().item() / max(scale, 1e-30)
        if not err <= _SELF_CHECK_TOL[x.dtype]:  # also catches NaN
            warnings.warn(
                f"kernels.linear_plan: config {cfg} disagrees with cuBLAS for N={N} K={K} M={M} "
                f"(relative error {err:.2e}); not used",
                stacklevel=3,
            )
            continue
        candidates[str(cfg)] = lambda o, cfg=cfg: linear(x, weight, bias, out=o, config=cfg, **kwargs)
    if len(candidates) == 1:
        return LinearPlan("cublas", None, "no Triton config passed the self-check")

    # Time with L2 flushed before each repetition: in a decode step each weight comes from HBM.
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    flush = torch.empty(min(2 * l2, 256 * 2**20) // 4, dtype=torch.float32, device=device)
    outs = {name: torch.empty(shape, dtype=x.dtype, device=device) for name in candidates}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    events = []
    for _ in range(_MEASURE_REPS):
        for name, fn in candidates.items():  # interleaved, so drift hits every candidate alike
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(outs[name])
            end.record()
            events.append((name, start, end))
    torch.cuda.synchronize(device)
    for name, start, end in events:
        samples[name].append(start.elapsed_time(end) * 1e3)
    del flush
    times = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    best = min(times, key=times.get)
    summary = ", ".join(f"{n}: {t:.1f} us" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
    if best == "cublas":
        return LinearPlan("cublas", None, f"measured ({summary})", times)
    cfg = next(c for c in configs if str(c) == best)
    return LinearPlan("triton", cfg, f"measured ({summary})", times)

