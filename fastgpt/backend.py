"""The kernel boundary: which implementation of each hot op runs, and a record of what ran.

The model calls :func:`attention` and :func:`select_next_token` and nothing else kernel-specific,
so the Triton and CUDA kernels replace the PyTorch reference without touching the model.

``FASTGPT_BACKEND`` picks the implementation, read each time ``forward()`` / ``generate()`` runs:

* ``torch``  -- the PyTorch reference ops (``fastgpt.reference``): the CPU default and the oracle.
* ``triton`` -- the Triton kernels (``kernels/``): on CUDA, or on the CPU under
  ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for tests).
* ``auto`` or unset -- the fastest available on the device: ``triton`` on CUDA when Triton
  imports, else ``torch``.

:func:`kernels_report` says which implementation each op actually used since the last
:func:`reset_kernels_report`; benchmarks print it and tests assert it.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import reference

BACKENDS = ("torch", "triton")
_ran: dict[str, str] = {}


def resolve_backend(device: torch.device | str) -> str:
    """The backend ``FASTGPT_BACKEND`` selects for tensors on ``device``."""
    device = torch.device(device)
    choice = os.environ.get("FASTGPT_BACKEND", "auto").strip().lower() or "auto"
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if device.type == "cuda" and _triton_kernels_importable():
            return "triton"
        return "torch"
    if choice == "triton":
        from kernels.utils import triton_usable_on

        if not triton_usable_on(device):
            raise ValueError(
                f"FASTGPT_BACKEND=triton cannot run on {device}: it needs a CUDA device, or on the CPU "
                "the Triton interpreter (set TRITON_INTERPRET=1 before starting Python), and triton installed"
            )
        return "triton"
    raise ValueError(f"FASTGPT_BACKEND must be one of torch, triton, auto; got {choice!r}")


@functools.cache
def _triton_kernels_importable() -> bool:
    try:
        import kernels.attention  # noqa: F401
        import kernels.sampling  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise its driver
        warnings.warn(f"fastgpt: Triton kernels unavailable ({exc}); using the PyTorch backend", stacklevel=3)
        return False
    return True


def _record(op: str, impl: str) -> None:
    _ran[op] = impl


def kernels_report() -> dict[str, str]:
    """``{op: implementation}`` for every op run since the last :func:`reset_kernels_report`."""
    return dict(_ran)


def reset_kernels_report() -> None:
    _ran.clear()


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, backend: str) -> torch.Tensor:
    """Causal attention of ``T`` new tokens over ``cache`` (their K/V are written into it).

    q, k, v: (B, T, H, D) views of the fused QKV projection. Returns (B, T, H, D).
    """
    k_cache, v_cache = cache.layer(layer)
    T = q.shape[1]
    if backend == "triton":
        import kernels.attention as triton_attention

        if cache.pos == 0:
            _record("attention.prefill", "triton")
            return triton_attention.prefill_attention(q, k, v, k_cache, v_cache, cache.row_start)
        if T == 1:
            workspace = cache.workspace.get("attention")
            if workspace is None:
                workspace = triton_attention.decode_workspace(
                    cache.batch, cache.n_head, cache.head_dim, cache.max_len, cache.device
                )
                cache.workspace["attention"] = workspace
            _record("attention.decode", "triton")
            return triton_attention.decode_attention(
                q, k, v, k_cache, v_cache, cache.pos_tensor, cache.row_start, workspace
            )
        # Several new tokens after a prefix (chunked prefill) has no kernel yet.
        _record("attention.extend", "torch")
    else:
        _record("attention.prefill" if cache.pos == 0 else ("attention.decode" if T == 1 else "attention.extend"), "torch")
    row_start = cache.row_start if cache.has_padding else None
    return reference.attention(q, k, v, k_cache, v_cache, cache.pos, row_start)


# --------------------------------------------------------------------------------------------
# Next-token selection
# --------------------------------------------------------------------------------------------
class SamplingState:
    """Per-row sampling settings as device tensors, plus the RNG state, for one generate() call.

    Settings live on the device so that the same code (and later the same captured CUDA graph)
    serves any values and a batch can mix them. ``all_greedy`` lets the PyTorch path skip the
    filtering work when no row samples.
    """

    def __init__(self, batch: int, device: torch.device, *, temperature, top_k, top_p, min_p, seed: int | None):
        self.temperature = reference.as_row_tensor(temperature, batch, torch.float32, device, "temperature").contiguous()
        self.top_k = reference.as_row_tensor(top_k, batch, torch.int32, device, "top_k").contiguous()
        self.top_p = reference.as_row_tensor(top_p, batch, torch.float32, device, "top_p").contiguous()
        self.min_p = reference.as_row_tensor(min_p, batch, torch.float32, device, "min_p").contiguous()
        self.all_greedy = bool((self.temperature == 0).all()) if device.type == "cpu" else _is_zero(temperature)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed_value = seed
        self.seed = torch.tensor([seed], dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)


def _is_zero(value) -> bool:
    if isinstance(value, torch.Tensor):
        return False  # deciding would need a sync; take the general path
    return value == 0


def select_next_token(logits: torch.Tensor, state: SamplingState, backend: str) -> torch.Tensor:
    """``(B, V)`` float32 logits -> ``(B,)`` int64 next tokens; advances ``state.step`` on the device."""
    if backend == "triton":
        import kernels.sampling as triton_sampling

        _record("sample", "triton")
        tokens = triton_sampling.sample(
            logits, state.temperature, state.top_k, state.top_p, state.min_p, state.seed, state.step
        )
    elif state.all_greedy:
        _record("sample", "torch:greedy")
        tokens = reference.greedy(logits)
    else:
        _record("sample", "torch")
        tokens = reference.sample(
            logits, state.temperature, state.top_k, state.top_p, state.min_p, generator=state.generator
        )
    state.step.add_(1)
    return tokens
