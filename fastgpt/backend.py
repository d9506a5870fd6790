"""The kernel boundary: which implementation of each hot op runs, and a record of what ran.

The model calls :func:`attention`, :func:`select_next_token` and the layer ops :func:`ln_linear` /
:func:`residual_linear` / :func:`attention_residual_linear` (LayerNorm + projection, projection +
residual, attention + out-projection + residual, whose Triton decode step leaves the attention's
split combine to the projection's launch; built on :func:`add_layernorm`) and nothing else kernel-specific, so the Triton and CUDA kernels replace
the PyTorch reference without touching the model. Beam search takes its top-k through
:func:`topk` (the CUDA/CPU top-k op).

``FASTGPT_BACKEND`` picks the implementation, read each time ``forward()`` / ``generate()`` runs:

* ``torch``  -- the PyTorch reference ops (``fastgpt.reference``): the CPU default and the oracle.
* ``triton`` -- the Triton kernels (``kernels/``): on CUDA, or on the CPU under
  ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for tests).
* ``auto`` or unset -- the fastest available on the device: ``triton`` on CUDA when Triton
  imports, else ``torch``.

:func:`run_report` is the one record of what ran (contract C2): :func:`kernels_report` (which
implementation each op used since the last :func:`reset_kernels_report`), :func:`last_generate_stats`
(what the last generate() did) and the kernels' launch record. Benchmarks print it; tests assert it.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

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
        from fastgpt.kernels.utils import triton_usable_on

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
        import fastgpt.kernels.attention_decode  # noqa: F401
        import fastgpt.kernels.attention_prefill  # noqa: F401
        import fastgpt.kernels.sampling  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise its driver
        warnings.warn(f"fastgpt: Triton kernels unavailable ({exc}); using the PyTorch backend", stacklevel=3)
        return False
    return True


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _record(op: str, impl: str) -> None:
    _ran[op] = impl


def kernels_report() -> dict[str, str]:
    """``{op: implementation}`` for every op run since the last :func:`reset_kernels_report`."""
    return dict(_ran)


def reset_kernels_report() -> None:
    _ran.clear()


_last_generate: dict = {}


def record_generate(**stats) -> dict:
    """Start the record of one generate() call (its loop fills in ``decode_steps`` at the end)."""
    _last_generate.clear()
    _last_generate.update(decode_steps=0, **stats)
    return _last_generate


def last_generate_stats() -> dict:
    """What the last generate() call did.

    Keys: ``loop`` ("fast", "streaming" or "beam"), ``path`` ("graph" or "eager"), ``captured``
    (this call captured the graph), ``capture_s`` (seconds spent warming up and capturing, 0 when
    reused), ``reason`` (why eager, or None), ``key`` (the graph's ``GraphKey`` or None),
    ``decode_steps`` (steps after the prefill).
    """
    return dict(_last_generate)


def _launch_record() -> dict:
    try:
        from fastgpt.kernels.utils import launch_record
    except ImportError:  # the kernels' registry (contract C2) is not in this tree yet
        return {}
    return launch_record()


def run_report() -> dict:
    """One record of what ran (contract C2).

    ``{"dispatch": kernels_report(), "generate": last_generate_stats(), "launches":
    fastgpt.kernels.utils.launch_record()}``: which implementation each op used since
    :func:`reset_kernels_report`, what the last generate() call did, and what each kernel
    launcher ran (with its details).
    """
    return {"dispatch": kernels_report(), "generate": last_generate_stats(), "launches": _launch_record()}


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, backend: str, *, rope: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention of ``T`` new tokens over ``cache`` (their K/V are written into it).

    q (B, T, H, D), k and v (B, T, H_kv, D): views of the fused QKV projection (grouped-query
    attention when H_kv < H). ``rope``: the rotary inverse frequencies (LLaMA family), applied to
    q and k inside the attention op, or None. Returns (B, T, H, D).
    """
    k_cache, v_cache = cache.layer(layer)
    T = q.shape[1]
    if backend == "triton":
        from fastgpt.kernels import attention_decode, attention_prefill
        from fastgpt.kernels.attention_common import SUPPORTED_HEAD_DIMS

        if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            _warn_once(
                f"fastgpt: the Triton attention kernels support head_dim {SUPPORTED_HEAD_DIMS}, "
                f"this model has {q.shape[-1]}; attention runs in PyTorch (CUDA-graph safe, slower)"
            )
            _record("attention", "torch:attention_at")
            return reference.attention_at(q, k, v, k_cache, v_cache, cache.pos_tensor, cache.row_start, rope=rope)
        if cache.pos == 0:
            _record("attention.prefill", "triton")
            return attention_prefill.prefill_attention(q, k, v, k_cache, v_cache, cache.row_start, rope=rope)
        if T == 1:
            _record("attention.decode", "triton")
            return attention_decode.decode_attention(
                q, k, v, k_cache, v_cache, cache.pos_tensor, cache.row_start, _decode_workspace(cache, q.shape[2]),
                rope=rope,
            )
        # Several new tokens after a prefix (chunked prefill) has no kernel yet.
        _record("attention.extend", "torch")
    else:
        _record("attention.prefill" if cache.pos == 0 else ("attention.decode" if T == 1 else "attention.extend"), "torch")
    row_start = cache.row_start if cache.has_padding else None
    return reference.attention(q, k, v, k_cache, v_cache, cache.pos, row_start, rope=rope)


def _decode_workspace(cache, n_head: int) -> dict:
    """The flash-decoding partials for ``n_head`` query heads over ``cache``'s shape (its own
    ``n_head`` counts K/V heads), kept in ``cache.workspace``."""
    workspace = cache.workspace.get("attention")
    if workspace is None:  # eager decoding: allocated at the first step (see allocate_workspaces)
        from fastgpt.kernels import attention_decode

        workspace = attention_decode.decode_workspace(
            cache.batch, n_head, cache.head_dim, cache.max_len, cache.device, n_kv_head=cache.n_head
        )
        cache.workspace["attention"] = workspace
    return workspace


def attention_residual_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache,
    layer: int,
    proj,
    x: torch.Tensor,
    backend: str,
    *,
    rope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention then the residual out-projection ``x + attn @ W^T + b``, as ``(stream, pending delta)``.

    Triton decode step (T == 1 after a prefix) with a "triton" plan for the projection: two
    launches -- the decode attention leaves its per-split partials (``combine=False``) and the
    out-projection GEMV combines them in its prologue (``kernels.linear.linear(attn_partials=)``);
    no combine kernel. Otherwise :func:`attention` then :func:`residual_linear`. The fused path
    records ``attention.combine`` -> ``"attn_proj"`` beside ``attention.decode`` -> ``"triton"``.
    """
    B, T, H, D = q.shape
    if backend == "triton" and T == 1 and cache.pos > 0:
        import fastgpt.kernels.linear as triton_linear
        import fastgpt.kernels.linear_plan as linear_plan
        from fastgpt.kernels import attention_decode
        from fastgpt.kernels.attention_common import SUPPORTED_HEAD_DIMS

        weight, bias = proj.weight, getattr(proj, "bias", None)
        if D in SUPPORTED_HEAD_DIMS:
            rows = q.flatten(2)  # (B, 1, H, D) -> (B, 1, C): the projection's input shape (for the plan)
            chosen = linear_plan.plan(rows, weight, bias, residual=x)
            if chosen.impl == "triton":
                k_cache, v_cache = cache.layer(layer)
                partials = attention_decode.decode_attention(
                    q, k, v, k_cache, v_cache, cache.pos_tensor, cache.row_start, _decode_workspace(cache, H),
                    combine=False, rope=rope,
                )  # fmt: skip
                _record("attention.decode", "triton")
                _record("attention.combine", "attn_proj")
                _record(f"linear.attn_proj.{_phase(rows)}", "triton")
                return triton_linear.linear(None, weight, bias, residual=x, config=chosen.config, attn_partials=partials), None
    y = attention(q, k, v, cache, layer, backend, rope=rope)  # (B, T, H, D)
    return residual_linear(y.reshape(B, T, H * D), proj, x, backend, op="attn_proj")  # (B, T, H, D) -> (B, T, C)


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------
def embed(ids: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, cache) -> torch.Tensor:
    """``wte[ids] + wpe[positions]`` ``(B, T, C)`` at the cache's next slots, one Triton launch
    (positions from ``cache.pos_tensor`` and ``cache.row_start`` on the device)."""
    from fastgpt.kernels import embedding

    _record("embedding", "triton")
    return embedding.embed(ids, wte, wpe, cache.pos_tensor, cache.row_start)


# --------------------------------------------------------------------------------------------
# Next-token selection
# --------------------------------------------------------------------------------------------
class SamplingState:
    """Per-row sampling settings as device tensors, plus the RNG state, for one generate() call.

    Settings live on the device so that the same code (and the same captured CUDA graph) serves
    any values and a batch can mix them. ``all_greedy`` lets the PyTorch path skip the filtering
    work when no row samples. ``status`` ``(B, 2)`` int32 is the sampler's failure record
    (contract C1: bit 1 NaN, 2 +inf, 4 every token banned, in column 0; the RNG step of the first
    failure in column 1), zeroed here and read only at the decode loop's host checks.
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
        self.status = torch.zeros((batch, 2), dtype=torch.int32, device=device)
        self.generator = torch.Generator(device=device)
        #: Scratch of the Triton sampler (kernels.sampling.sampling_workspace), see allocate_workspaces.
        self.workspace: dict | None = None
        self.generator.manual_seed(seed)


def _is_zero(value) -> bool:
    if isinstance(value, torch.Tensor):
        return False  # deciding would need a sync; take the general path
    return value == 0


def allocate_workspaces(
    cache, sampling: SamplingState, vocab_size: int, backend: str, *, n_head: int | None = None
) -> None:
    """Allocate the decode step's scratch (attention split partials, sampler workspace) now.

    ``n_head``: the model's query heads (None: the cache's, i.e. no grouped-query attention); the
    partials are per query head.

    The CUDA-graph capture calls this on the main stream before its warm-up on a side stream, so
    no workspace a graph replays into is owned by the side stream's allocator pool.
    """
    if backend != "triton":
        return
    import fastgpt.kernels.sampling as triton_sampling
    from fastgpt.kernels import attention_decode
    from fastgpt.kernels.attention_common import SUPPORTED_HEAD_DIMS

    if "attention" not in cache.workspace and cache.head_dim in SUPPORTED_HEAD_DIMS:
        cache.workspace["attention"] = attention_decode.decode_workspace(
            cache.batch, n_head or cache.n_head, cache.head_dim, cache.max_len, cache.device, n_kv_head=cache.n_head
        )
    if sampling.workspace is None:
        sampling.workspace = triton_sampling.sampling_workspace(cache.batch, vocab_size, cache.device)


class StepBookkeeping(NamedTuple):
    """What a decode step updates besides choosing tokens (all device tensors, so a captured
    graph serves any values): EOS ids ``(n_eos,)`` int64 (None: no EOS), the pad id ``()``
    int64, the ``(B,)`` bool finished flags, the ``(1,)`` int64 token count, the ``(1,)`` int64
    ``min_new_tokens`` bound (None: no EOS ban), the cache's ``(1,)`` int32 position and how far
    this step advances it (0 after a prefill, whose model call advanced it)."""

    eos: torch.Tensor | None
    pad: torch.Tensor
    finished: torch.Tensor
    n_generated: torch.Tensor
    min_new: torch.Tensor | None
    cache_pos: torch.Tensor
    cache_advance: int


def ban_early_eos(scores: torch.Tensor, eos: torch.Tensor, n_generated: torch.Tensor, min_new: torch.Tensor) -> None:
    """HF's ``min_new_tokens``: EOS columns of ``scores`` ``(B, V)`` to ``-inf`` while
    ``n_generated < min_new`` (both ``(1,)`` device tensors), in place.

    index_select / index_copy_ on the ``(B, n_eos)`` EOS columns: no host sync, graph-capturable,
    and one bound serves every call (it is a device tensor, not a baked-in constant). The Triton
    sampler does the same inside its first kernel.
    """
    eos_scores = scores.index_select(1, eos)  # (B, n_eos)
    early = n_generated < min_new  # (1,)
    scores.index_copy_(1, eos, torch.where(early, float("-inf"), eos_scores))


def select_next_token(
    logits: torch.Tensor,
    state: SamplingState,
    backend: str,
    *,
    book: StepBookkeeping | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` int64 next tokens; advances ``state.step`` on the device.

    With ``book`` the whole rest of the decode step happens here too: the EOS ban before
    ``min_new_tokens``, a finished row's pad, the finished flags, the token count and the cache
    position; ``out`` receives the tokens (the step's input buffer). The Triton sampler does all of
    it in its two launches; the PyTorch path (the oracle) in separate ops with the same semantics.
    """
    if backend == "triton":
        import fastgpt.kernels.sampling as triton_sampling

        _record("sample", "triton")
        B, V = logits.shape
        workspace = state.workspace
        if workspace is None or workspace["vocab"] != V or workspace["batch"] < B:
            # Allocated once per generate (or per captured graph), before any capture: replays reuse it.
            workspace = state.workspace = triton_sampling.sampling_workspace(B, V, logits.device)
        extra = {}
        if book is not None:
            if book.eos is not None:
                extra = dict(eos=book.eos, pad=book.pad, finished=book.finished, min_new_tokens=book.min_new)
            extra.update(n_generated=book.n_generated, cache_pos=book.cache_pos, cache_advance=book.cache_advance)
        tokens = triton_sampling.sample(
            logits, state.temperature, state.top_k, state.top_p, state.min_p, state.seed, state.step,
            workspace=workspace, status=state.status, out=out, check_values=False, **extra,
        )  # fmt: skip
        if book is None:
            state.step.add_(1)
        return tokens
    if book is not None and book.min_new is not None:
        ban_early_eos(logits, book.eos, book.n_generated, book.min_new)
    if state.all_greedy:
        _record("sample", "torch:greedy")
        tokens = reference.greedy(logits)
    else:
        _record("sample", "torch")
        tokens = reference.sample(
            logits, state.temperature, state.top_k, state.top_p, state.min_p, generator=state.generator,
            status=state.status, step=state.step,
        )  # fmt: skip
    state.step.add_(1)
    if book is not None:
        if book.eos is not None:
            tokens = torch.where(book.finished, book.pad, tokens)
            # (B, 1) == (1, n_eos): membership without torch.isin (whose CUDA path may sort).
            book.finished.logical_or_((tokens[:, None] == book.eos[None, :]).any(dim=1))
        book.n_generated.add_(1)
        if book.cache_advance:
            book.cache_pos.add_(book.cache_advance)
    if out is not None:
        out.copy_(tokens)
        return out
    return tokens


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, n) -> (values, int64 indices)`` of the ``k`` largest per row, ties to the lower
    index: the CUDA/CPU top-k op (``fastgpt.kernels.topk``, contract C3; it falls back to
    ``torch`` with one warning when the op cannot be built). Records ``topk`` -> its path.
    Graph-capturable on CUDA once loaded (tests/test_beam_search.py replays it in a CUDA graph)."""
    import fastgpt.kernels.topk as topk_op

    values, indices = topk_op.topk(x, k)
    path = getattr(topk_op, "topk_backend", None)  # the launch record (C2) has the details
    _record("topk", path(x.device) if path is not None else "op")
    return values, indices


# --------------------------------------------------------------------------------------------
# Linear layers and LayerNorm: fused GEMV epilogues/prologues, add + LayerNorm
# --------------------------------------------------------------------------------------------
# The model's residual stream is carried as ``(x, delta)``: ``x`` the stream so far and ``delta``
# an update not yet added (or None). A projection whose GEMV adds the residual in its epilogue
# returns ``(x + proj, None)``; one that runs on cuBLAS returns ``(x, proj)`` and the add happens
# in the next LayerNorm, which is then one add + LayerNorm launch (kernels.layernorm) instead of
# two kernels. The PyTorch backend defers too, and computes exactly what the unfused model
# computed: ``x + proj`` then ``F.layer_norm``.
#
# kernels_report() keys: ``linear.<op>.<gemv|gemm>`` (gemv: M = B*T <= 16) -> "triton" (the fused
# GEMV), "cublas" (kernels.linear.cublas_linear), "torch" (reference ops); ``layernorm.<op>`` ->
# "triton" / "torch" when a LayerNorm runs as its own launch.
#: Rows (B*T) up to which a projection counts as a GEMV; equals kernels.linear.GEMV_MAX_M (tested).
GEMV_MAX_M = 16


def _phase(x: torch.Tensor) -> str:
    return "gemv" if x.numel() // x.shape[-1] <= GEMV_MAX_M else "gemm"


def _norm_of(ln) -> dict:
    """The fused ops' norm keywords of a norm module: ``nn.LayerNorm`` (weight, bias; the ops'
    default ``norm``) or ``nn.RMSNorm`` (weight only, ``norm="rmsnorm"``)."""
    if isinstance(ln, torch.nn.RMSNorm):
        eps = ln.eps if ln.eps is not None else torch.finfo(ln.weight.dtype).eps
        return dict(ln_weight=ln.weight, ln_bias=None, ln_eps=eps, norm="rmsnorm")
    return dict(ln_weight=ln.weight, ln_bias=ln.bias, ln_eps=ln.eps)


def add_layernorm(
    x: torch.Tensor, ln, backend: str, *, residual: torch.Tensor | None = None, op: str = "layernorm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` (``residual`` None: ``(norm(x), x)``) for a LayerNorm
    or RMSNorm module ``ln``; one Triton launch."""
    args = _norm_of(ln)
    rms = args.get("norm") == "rmsnorm"
    if backend == "triton":
        import fastgpt.kernels.layernorm as triton_layernorm

        _record(f"layernorm.{op}", "triton")
        if rms:
            return triton_layernorm.add_rmsnorm(x, ln.weight, args["ln_eps"], residual=residual)
        return triton_layernorm.add_layernorm(x, ln.weight, ln.bias, ln.eps, residual=residual)
    _record(f"layernorm.{op}", "torch")
    if rms:
        return reference.add_rmsnorm(x, ln.weight, args["ln_eps"], residual=residual)
    return reference.add_layernorm(x, ln.weight, ln.bias, ln.eps, residual=residual)


def ln_linear(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    ln,
    layer,
    backend: str,
    *,
    activation: str | None = None,
    op: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm (LayerNorm or RMSNorm module ``ln``) followed by a projection, on the residual
    stream ``x + delta``.

    Returns ``(act(norm(x + delta) @ W^T + b), x + delta)``: the projection, and the stream with
    the pending update added (the next residual projection adds to it). ``activation="silu_glu"``
    halves the width (SwiGLU, see ``fastgpt.reference.activate``).

    Triton backend: with a "triton" plan, one GEMV launch with the norm in its prologue
    (plus one add when ``delta`` is pending, i.e. after the embedding or a cuBLAS projection);
    with a "cublas" plan, one add + norm launch, then cuBLAS and the activation.
    """
    weight, bias = layer.weight, getattr(layer, "bias", None)
    norm = _norm_of(ln)
    if backend == "triton":
        import fastgpt.kernels.linear as triton_linear
        import fastgpt.kernels.linear_plan as linear_plan

        chosen = linear_plan.plan(x, weight, bias, activation=activation, **norm)
        _record(f"linear.{op}.{_phase(x)}", chosen.impl)
        if chosen.impl == "triton":
            if delta is not None:
                x = x + delta
            y = triton_linear.linear(x, weight, bias, activation=activation, config=chosen.config, **norm)
            return y, x
        h, x = add_layernorm(x, ln, backend, residual=delta, op=op)
        return triton_linear.cublas_linear(h, weight, bias, activation=activation), x
    h, x = add_layernorm(x, ln, backend, residual=delta, op=op)
    _record(f"linear.{op}.{_phase(h)}", "torch")
    return reference.linear(h, weight, bias, activation=activation), x


def residual_linear(
    y: torch.Tensor, layer, x: torch.Tensor, backend: str, *, op: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual projection ``x + y @ W^T + b`` as ``(stream, pending delta)``.

    A "triton" plan adds ``x`` in the GEMV epilogue and returns ``(x + proj, None)``; cuBLAS and
    the PyTorch backend return ``(x, proj)``, leaving the add to the next :func:`ln_linear`.
    """
    weight, bias = layer.weight, getattr(layer, "bias", None)
    if backend == "triton":
        import fastgpt.kernels.linear as triton_linear
        import fastgpt.kernels.linear_plan as linear_plan

        chosen = linear_plan.plan(y, weight, bias, residual=x)
        _record(f"linear.{op}.{_phase(y)}", chosen.impl)
        if chosen.impl == "triton":
            return triton_linear.linear(y, weight, bias, residual=x, config=chosen.config), None
        return x, triton_linear.cublas_linear(y, weight, bias)
    _record(f"linear.{op}.{_phase(y)}", "torch")
    return x, reference.linear(y, weight, bias)
