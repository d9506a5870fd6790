"""Count the kernel launches of one decode step without a GPU: ``count_decode_launches``.

A decode step inside a CUDA graph costs its bytes plus about 1.3-4 us per dependent launch, so the
number of launches per token is half of the performance model (issue 14). This module counts them
on any device (the CPU included) by watching two doors while the step runs:

* every ATen op the step dispatches (a ``TorchDispatchMode``): on CUDA each one that computes or
  copies launches at least one kernel. Views, metadata queries and allocations launch nothing
  and are not counted (``_NO_LAUNCH``); in-place ops and copies are counted.
* every Triton kernel launch (``JITFunction.run`` / the interpreter's ``InterpretedFunction.run``,
  wrapped while counting). The ATen ops a launch does itself (the interpreter copies its
  arguments) are not counted: the mode is suspended while the kernel runs.

Launches do not depend on the width of the model, so a model of the real layer structure (the
same number of layers, head_dim 64, a tiny width and vocabulary) counts what gpt2 / gpt2-xl
launch; :func:`structure_model` builds one. For the LLaMA family (issue 15) the structure is the
preset's (``llama-3.2-1b``, ``qwen2.5-0.5b``, ...: layers, head_dim, rope and its scaling,
biases, tied or untied head) with ONE K/V head and the preset's group of query heads per K/V
head (4 for Llama-3.2-1B, 7 for Qwen2.5-0.5B): the launches of a layer are those of the real
model (RMSNorm + Q/K/V + rotary, attention, out-projection, RMSNorm + gate/up + SwiGLU, down
projection), its budget GPT-2's 5 per layer. Which layer a launch belongs to comes from forward
hooks on the blocks (``model.h[i]``); everything else (embedding, ln_f + LM head, the sampler,
the step's bookkeeping) is "outside".

What is counted is exactly what a CUDA graph captures (:meth:`fastgpt.decoder.Decoder.step_into`),
taken eagerly after one warm-up step (workspaces allocated). With ``run_kernels=False`` (the
default) the Triton kernels are launched but not executed: a launch count does not depend on the
values computed, and the Triton interpreter would spend minutes on gpt2-xl's 48 layers. ``host_syncs`` counts the ops that
read device data back to the host (``.item()``, ``bool(t)``, data-dependent shapes); it must be 0.

Used by tests/test_launches.py (the budget: gpt2 <= 64, gpt2-xl <= 244; the LLaMA family no
more per layer than GPT-2) and by the benchmarks (``launches_per_token`` of a row).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = ["count_decode_launches", "structure_model", "LaunchCounter", "STRUCTURES", "LLAMA_STRUCTURES"]

#: (n_layer, n_head) of the real models; head_dim 64 as theirs (the attention kernels need it).
#: The LLaMA family's structures come from their presets (:data:`LLAMA_STRUCTURES`).
STRUCTURES = {"gpt2": (12, 12), "gpt2-medium": (24, 16), "gpt2-large": (36, 20), "gpt2-xl": (48, 25)}
#: The LLaMA-family presets :func:`structure_model` builds (``fastgpt.config.PRESETS``).
LLAMA_STRUCTURES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen2.5-1.5b", "mistral-7b-v0.1",
                    "smollm2-135m")  # fmt: skip

_aten = torch.ops.aten
#: ATen ops that launch no kernel on CUDA: allocations and metadata (views are recognised by
#: their schema, ``OpOverload.is_view``).
_NO_LAUNCH = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.detach.default,
    _aten.alias.default,
    _aten.lift_fresh.default,
    _aten.sym_size.int,
    _aten.sym_stride.int,
    _aten.sym_numel.default,
    _aten.sym_storage_offset.default,
    _aten.is_same_size.default,
    _aten.set_.source_Storage_storage_offset,
    _aten.resize_.default,
}
#: ATen ops that read device data on the host (a device sync on CUDA).
_HOST_SYNC = {
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten._unique2.default,
    _aten.repeat_interleave.Tensor,
    _aten.item.default,
}


class LaunchCounter(TorchDispatchMode):
    """Counts launches (ATen ops that launch + Triton kernels) per region while active.

    ``region`` names where a launch is attributed ("outside", or "layer 3" set by block hooks);
    ``counts[(region, name)]`` the launches of one op name there; ``host_syncs`` the host reads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.host_syncs: Counter = Counter()
        self.region = "outside"
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNC:
            self.host_syncs[str(func)] += 1
        if func not in _NO_LAUNCH and not func.is_view and func not in _HOST_SYNC:
            self.counts[(self.region, f"aten.{func.__name__}")] += 1
        return func(*args, **kwargs)

    def note_triton(self, kernel) -> None:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        self.counts[(self.region, f"triton.{name}")] += 1

    # ---- summaries ------------------------------------------------------------------------------
    def per_region(self) -> Counter:
        totals: Counter = Counter()
        for (region, _name), n in self.counts.items():
            totals[region] += n
        return totals

    def ops_in(self, region: str) -> dict[str, int]:
        return {name: n for (r, name), n in sorted(self.counts.items()) if r == region}


@contextlib.contextmanager
def _watching_triton(counter: LaunchCounter, run_kernels: bool):
    """Wrap the Triton launch path (compiled and interpreted): while ``counter.on``, each launch
    is noted; with ``run_kernels=False`` no kernel executes (the launchers' Python still runs)."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        pass
    originals = {cls: cls.run for cls in classes}

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            if counter.on:
                counter.note_triton(self)
            if not run_kernels:
                return None
            with _disable_current_modes():  # the launch's own tensor handling is not a launch
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls in classes:
        cls.run = wrap(originals[cls])
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


@contextlib.contextmanager
def _layer_regions(model, counter: LaunchCounter):
    """Attribute launches inside ``model.h[i]`` to ``"layer i"``."""
    handles = []
    for i, block in enumerate(model.h):

        def enter(_module, _inputs, i=i):
            counter.region = f"layer {i}"

        def leave(_module, _inputs, _output):
            counter.region = "outside"

        handles.append(block.register_forward_pre_hook(enter))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def structure_config(name: str, *, vocab: int = 257, n_positions: int = 64):
    """The ``GPTConfig`` of :func:`structure_model`."""
    from fastgpt.config import GPTConfig

    if name in LLAMA_STRUCTURES:
        preset = GPTConfig.from_preset(name)
        group = preset.n_head // preset.kv_heads
        window = None if preset.sliding_window is None else n_positions
        return GPTConfig.from_preset(name, vocab_size=vocab, n_positions=n_positions, n_embd=group * preset.head_dim,
                                     n_head=group, n_kv_head=1, head_size=None, n_inner=128, sliding_window=window)  # fmt: skip
    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; choose one of {', '.join([*STRUCTURES, *LLAMA_STRUCTURES])}")
    n_layer, _n_head = STRUCTURES[name]
    return GPTConfig(vocab_size=vocab, n_positions=n_positions, n_embd=64, n_head=1, n_layer=n_layer)


def structure_model(name: str, *, vocab: int = 257, n_positions: int = 64, device="cpu", dtype=torch.float16):
    """A random fastgpt GPT with the layer structure of ``name``: GPT-2 (``STRUCTURES``) the same
    number of layers, head_dim 64, one head (width 64); the LLaMA family (``LLAMA_STRUCTURES``) the
    preset with one K/V head and its group of query heads (width ``group * head_dim``); a tiny
    vocabulary and MLP -- the same launches per step as the real model."""
    from fastgpt import GPT

    return GPT.from_config(structure_config(name, vocab=vocab, n_positions=n_positions), dtype=dtype, device=device)


@torch.no_grad()
def count_decode_launches(
    model,
    *,
    batch: int = 1,
    prompt_len: int = 4,
    max_new_tokens: int = 8,
    run_kernels: bool = False,
    **options,
) -> dict:
    """The launches of ONE decode step of ``model`` (what a CUDA graph captures), counted.

    Parameters
    ----------
    model : fastgpt.GPT (any device; the backend is ``FASTGPT_BACKEND``'s choice for it).
    batch, prompt_len, max_new_tokens : the generation the step belongs to.
    run_kernels : execute the Triton kernels (False: only their launchers run -- the count is the
        same, since no launch depends on computed values; the interpreter is slow).
    **options : generation options (``do_sample``, ``temperature``, ``top_k``, ``eos_token_id``,
        ``min_new_tokens``, ``seed``, ...), as ``generate`` takes them.

    Returns
    -------
    dict: ``launches_per_token`` (total), ``outside_layers``, ``per_layer`` (list, one per
    layer), ``layers``, ``host_syncs`` (must be 0), ``ops_outside`` and ``ops_layer0`` (op name ->
    launches), ``backend``.
    """
    from fastgpt import backend as _backend
    from fastgpt.decoder import Decoder
    from fastgpt.settings import GenerationSettings

    settings = GenerationSettings.create(model.config, prompt_len, max_new_tokens, **options)
    decoder = Decoder.create(model, settings, batch, prompt_len + max_new_tokens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(model.device)
    counter = LaunchCounter()
    with _watching_triton(counter, run_kernels):
        tokens = decoder.prefill(ids).clone()
        last = ids[:, -1].to(tokens.dtype)
        if not run_kernels:
            # The sampler did not run: ``tokens`` holds no ids. An ATen embedding (the LLaMA family's
            # gather) reads them, so give it valid ones; no launch depends on which.
            tokens.copy_(last)
        decoder.step_into(tokens)  # warm-up: the first step allocates the eager workspaces
        if not run_kernels:
            tokens.copy_(last)
        with _layer_regions(model, counter), counter:
            counter.on = True
            decoder.step_into(tokens)
            counter.on = False
    regions = counter.per_region()
    n_layer = len(model.h)
    per_layer = [regions.get(f"layer {i}", 0) for i in range(n_layer)]
    return {
        "launches_per_token": sum(regions.values()),
        "outside_layers": regions.get("outside", 0),
        "per_layer": per_layer,
        "layers": n_layer,
        "host_syncs": sum(counter.host_syncs.values()),
        "host_sync_ops": dict(counter.host_syncs),
        "ops_outside": counter.ops_in("outside"),
        "ops_layer0": counter.ops_in("layer 0"),
        "backend": _backend.resolve_backend(model.device),
    }
