"""The decode step as one CUDA graph: captured once per shape, replayed for every token.

Why
---
A GPT-2 decode step at batch 1 is a few hundred small kernels. Launched one by one from Python,
the host (Python, the dispatcher, the caching allocator, the launch calls) is slower than the
GPU, which then idles between kernels. A CUDA graph records the whole step once; a replay
launches all of it with one call, back to back on the GPU.

What is captured
----------------
:meth:`fastgpt.decoder.Decoder.step_into`, unchanged (the same function runs eagerly on the CPU,
in CI and with the ``torch`` backend): embedding, every layer, final LayerNorm, LM head, the EOS
ban (min_new_tokens), the sampler, the EOS -> pad bookkeeping, the chosen tokens written into the
graph's input buffer (by the sampler's last kernel), so replay ``n + 1`` reads what replay ``n``
chose. Everything that
changes from one step to the next is a device tensor that the step updates itself:
``cache.pos_tensor`` (the slot written), ``sampling.step`` (the RNG counter), ``n_generated``,
``finished``. The host-side ``cache.pos`` (which the eager path reads, and whose overflow check
``cache.advance`` does) is not advanced by a replay -- no Python runs -- so
:meth:`DecodeGraph.step` adds 1 to it after each replay. The attention kernel reads only
``pos_tensor`` inside the step; the host ``pos`` only chose "decode" (``pos > 0``, ``T == 1``) at
capture time.

Keys, persistent state, reuse
-----------------------------
A graph bakes in tensor addresses and launch shapes, so there is one per model (checked by its
parameters' addresses) and per :class:`GraphKey`: batch, KV-cache length, dtype, device,
backend, number of EOS ids, and whether EOS is banned early (``min_new_tokens > 0``). The cache
length is the bucket of prompt + max_new_tokens (:func:`fastgpt.kv_cache.bucket_length`, chosen by
the caller, ``fastgpt.generation``, for the eager path too), so calls of many lengths share a graph;
the attention's split count depends on the cache length only, so the bucket fixes it for both paths. Each :class:`DecodeGraph` owns the
state its graph reads and writes -- the KV cache (and the attention workspace attached to it),
the sampling settings, seed and step, the EOS/pad ids, ``min_new_tokens``, the finished flags,
the token buffer -- as one persistent :class:`~fastgpt.decoder.Decoder`. A later generate() with
the same key reuses all of it: :meth:`DecodeGraph.load` resets it in place (``copy_``, ``zero_``,
``fill_``) with the call's left padding and :class:`~fastgpt.settings.GenerationSettings` (greedy or sampling, temperature, top-k,
top-p, min-p, seed, EOS and pad ids, min_new_tokens). The KV cache needs no clearing: prefill
overwrites slots ``[0, T)`` and each step writes its slot before reading it; nothing past the
current slot is ever read. Graphs live in a small per-model LRU (``FASTGPT_GRAPH_CACHE_SIZE``,
default 4 shapes), freed with the model; :func:`clear_graph_cache` frees them at once.

Capture
-------
On the first call with a key: build the persistent state and allocate its workspaces (attention
split partials, sampler scratch) on the main stream, run the step eagerly ``N_WARMUP`` times
on a side stream (CUDA graphs require it; it also compiles and autotunes the Triton kernels and
resolves any first-use choice, so nothing of that kind happens during capture), then capture one
step with ``torch.cuda.graph(g, pool=<one pool per device, shared by all graphs>)``. The warm-up
steps run at the cache's last slot, the bandwidth-bound case the attention autotuner should see;
their writes (slot ``S_max - 1``, counters, flags) are undone by :meth:`DecodeGraph.load`, and
slot ``S_max - 1`` is never read by a generation (its last step writes slot ``S_max - 2``). The
graphs share their memory pool: they run one at a time on one stream and none of them keeps a
temporary alive from one replay to the next, so their temporaries may overlap.

When anything fails (a kernel that syncs, an unsupported op, out of memory), generate() decodes
eagerly and warns once (per distinct failure); the shape is remembered and not retried.
``fastgpt.last_generate_stats()`` says what the last generate() did: ``path`` ("graph" or
"eager"), ``captured`` and ``capture_s`` (a first call that captured), ``reason`` (why eager).

Where it applies: ``FASTGPT_CUDA_GRAPH`` = ``auto``/``1`` (default: on for CUDA tensors with the
``triton`` backend; the ``torch`` backend's reference attention slices the cache with the host
``pos``, which a replay cannot change, so it always runs eagerly) or ``0`` (always eager). The
CPU tests exercise the persistent state, keys, reuse and host bookkeeping by replacing
:meth:`DecodeGraph.capture` and :func:`unavailable_reason` (tests/helpers.py), not through a
production switch.

Entry point: ``GraphCache.graph_for(model, settings, batch, max_len, row_start)`` -> ``(graph, None)`` with
the graph loaded and marked in use, or ``(None, reason)``; the loop calls ``graph.step`` per token
and ``graph.release()`` at the end.

Not thread-safe: a graph and its state serve one generate() at a time. A concurrent or re-entrant
call with a shape whose graph is busy decodes eagerly.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from . import backend as _backend
from .decoder import Decoder

__all__ = [
    "ENV_VAR",
    "GraphKey",
    "DecodeGraph",
    "GraphCache",
    "graph_enabled",
    "unavailable_reason",
    "clear_graph_cache",
    "cached_graphs",
]

ENV_VAR = "FASTGPT_CUDA_GRAPH"
CACHE_SIZE_ENV_VAR = "FASTGPT_GRAPH_CACHE_SIZE"
#: Eager steps before the capture (compiles and autotunes the kernels, warms the allocator).
N_WARMUP = 3


class GraphKey(NamedTuple):
    """Everything a captured decode step is specialised on (besides the model's weights)."""

    batch: int
    max_len: int
    dtype: torch.dtype
    device: torch.device
    backend: str
    n_eos: int
    ban_eos_early: bool


def graph_enabled() -> bool:
    """Whether ``FASTGPT_CUDA_GRAPH`` allows graphs (read at every call)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("", "auto", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{ENV_VAR} must be one of auto, 1, 0; got {value!r}")


def unavailable_reason(device: torch.device | str, backend: str) -> str | None:
    """Why the decode step cannot run as a CUDA graph here, or None when it can."""
    if not graph_enabled():
        return f"disabled ({ENV_VAR}=0)"
    if torch.device(device).type != "cuda":
        return "not a CUDA device"
    if backend != "triton":
        return "the torch backend slices the KV cache with a host position (not capturable)"
    return None


# --------------------------------------------------------------------------------------------
# One captured step and its persistent state
# --------------------------------------------------------------------------------------------
class DecodeGraph:
    """A captured decode step with the persistent decoder state it reads and writes.

    ``decoder`` is a :class:`~fastgpt.decoder.Decoder` whose KV cache, sampling state, EOS state
    and flags belong to this graph; ``tokens`` ``(B,)`` int64 is the step's input and output.
    Use :meth:`load` before each generation, :meth:`step` per token, :meth:`release` at the end.
    """

    def __init__(self, model, key: GraphKey) -> None:
        self.key = key
        # Normal (not inference-mode) tensors, so that in-place resets work inside and outside
        # torch.inference_mode(); nothing here needs autograd.
        with torch.inference_mode(False), torch.no_grad():
            cache = model.new_cache(key.batch, key.max_len)
            sampling = _backend.SamplingState(
                key.batch, key.device, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0
            )
            # A weak reference to the model: the per-model registry is keyed weakly on it.
            self.decoder = Decoder(
                weakref.proxy(model),
                cache,
                sampling,
                eos_token_ids=[0] * key.n_eos or None,
                pad_token_id=0,
                min_new_tokens=1 if key.ban_eos_early else 0,
            )
            self.tokens = torch.zeros(key.batch, dtype=torch.long, device=key.device)
            _backend.allocate_workspaces(
                cache, sampling, model.config.vocab_size, key.backend, n_head=model.config.n_head
            )
        self._kv = (cache.k, cache.v)
        self._replay = None
        self.capture_s: float | None = None
        self.just_captured = False
        self.in_use = False

    # ---- capture ------------------------------------------------------------------------------
    def park_at_last_slot(self) -> None:
        """Put the cache at its last slot: where the warm-up steps write (see the module docstring)."""
        cache = self.decoder.cache
        cache.pos = cache.max_len - 1
        cache.pos_tensor.fill_(cache.max_len - 1)

    @torch.no_grad()
    def capture(self, n_warmup: int = N_WARMUP) -> None:
        """Warm the step up eagerly on a side stream, then capture it into a CUDA graph."""
        start = time.perf_counter()
        decoder = self.decoder
        with torch.cuda.device(self.key.device):
            ambient = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(ambient)  # the workspaces were allocated and zeroed on `ambient`
            with torch.cuda.stream(side):
                for _ in range(n_warmup):
                    self.park_at_last_slot()  # the host pos must be > 0: the decode branch
                    decoder.step(self.tokens)
            ambient.wait_stream(side)
            self.park_at_last_slot()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=_shared_pool(self.key.device)):
                    decoder.step_into(self.tokens)  # the next replay's input is this one's output
            finally:
                # torch.cuda.graph leaves its capture stream current when capture_end()
                # raises (an invalidated capture): restore the caller's stream.
                if torch.cuda.current_stream() != ambient:
                    torch.cuda.set_stream(ambient)
            torch.cuda.synchronize()
        self._replay = graph.replay
        self.capture_s = time.perf_counter() - start

    # ---- per generation ---------------------------------------------------------------------------
    def valid(self) -> bool:
        """False once beam search's ``reorder_rows`` swapped the cache buffers the graph reads."""
        cache = self.decoder.cache
        return cache.k is self._kv[0] and cache.v is self._kv[1]

    @torch.no_grad()
    def load(self, settings, row_start: torch.Tensor | None) -> None:
        """Reset the persistent state in place for a new generation.

        Parameters
        ----------
        settings : the call's :class:`fastgpt.settings.GenerationSettings` (sampling settings and
            seed, EOS and pad ids, min_new_tokens; the EOS count and ban as in the key).
        row_start : ``(B,)`` left-pad counts (any device), or None for no padding.
        """
        d = self.decoder
        cache = d.cache
        cache.reset()
        if row_start is not None:
            cache.set_row_start(row_start.to(device=cache.device, dtype=torch.int32))
        fresh = _backend.SamplingState(self.key.batch, self.key.device, **settings.sampling_kwargs)
        s = d.sampling
        for name in ("temperature", "top_k", "top_p", "min_p", "seed"):
            getattr(s, name).copy_(getattr(fresh, name))
        s.step.zero_()
        s.status.zero_()
        s.all_greedy, s.seed_value, s.generator = fresh.all_greedy, fresh.seed_value, fresh.generator
        d.finished.zero_()
        d.n_generated.zero_()
        if d.eos is not None:
            d.eos.copy_(torch.tensor(settings.eos_token_ids, dtype=torch.long))
        d.pad.fill_(settings.pad_token_id)
        d.min_new.fill_(settings.min_new_tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One replay: ``(B,)`` last tokens -> ``(B,)`` next tokens (the graph's own buffer,
        overwritten by the next replay: copy it out before calling again)."""
        cache = self.decoder.cache
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache overflow: decode step at slot {cache.pos} >= max_len {cache.max_len}")
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
        self._replay()
        cache.pos += 1  # a replay advanced pos_tensor on the device, not the host int
        return self.tokens

    def release(self) -> None:
        self.in_use = False

    def close(self) -> None:
        self._replay = None


# --------------------------------------------------------------------------------------------
# The per-model registry
# --------------------------------------------------------------------------------------------
_POOLS: dict[int, object] = {}
_WARNED: set[str] = set()


def _shared_pool(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


def _param_signature(model) -> tuple[int, ...]:
    # A graph reads the weights through raw addresses: replacing a parameter (or .to()) must
    # invalidate it. In-place weight updates keep the addresses and are seen by the graph.
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())


def _max_entries() -> int:
    value = os.environ.get(CACHE_SIZE_ENV_VAR, "4")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{CACHE_SIZE_ENV_VAR} must be an int >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{CACHE_SIZE_ENV_VAR} must be an int >= 1, got {n}")
    return n


def _warn_once(message: str) -> None:
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class GraphCache:
    """The captured graphs of one model: an LRU of :class:`DecodeGraph` by :class:`GraphKey`,
    the shapes whose capture failed, and the weights' addresses they were captured with."""

    _registry: "weakref.WeakKeyDictionary[object, GraphCache]" = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.entries: OrderedDict[GraphKey, DecodeGraph] = OrderedDict()
        self.failed: dict[GraphKey, str] = {}
        self.signature: tuple[int, ...] | None = None

    @classmethod
    def of(cls, model, create: bool = True) -> "GraphCache | None":
        graphs = cls._registry.get(model)
        if graphs is None and create:
            graphs = cls._registry[model] = cls()
            weakref.finalize(model, graphs.clear)
        return graphs

    def clear(self) -> None:
        for graph in self.entries.values():
            graph.close()
        self.entries.clear()
        self.failed.clear()

    @classmethod
    def graph_for(
        cls, model, settings, batch: int, max_len: int, row_start: torch.Tensor | None
    ) -> tuple[DecodeGraph | None, str | None]:
        """The graph for this generation, loaded (:meth:`DecodeGraph.load`) and marked in use, or
        ``(None, why it decodes eagerly)``."""
        backend = _backend.resolve_backend(model.device)
        reason = unavailable_reason(model.device, backend)
        if reason is not None:
            return None, reason
        n_eos = len(settings.eos_token_ids or ())
        key = GraphKey(batch, max_len, model.dtype, model.device, backend, n_eos, n_eos > 0 and settings.min_new_tokens > 0)
        graph, reason = cls.acquire(model, key)
        if graph is None:
            return None, reason
        try:
            graph.load(settings, row_start)
        except BaseException:
            graph.release()
            raise
        return graph, None

    @classmethod
    def acquire(cls, model, key: GraphKey) -> tuple[DecodeGraph | None, str | None]:
        """The captured graph for ``key`` (capturing it on first use), marked in use; or (None, why)."""
        graphs = cls.of(model)
        signature = _param_signature(model)
        if graphs.signature != signature:
            graphs.clear()
            graphs.signature = signature
        if key in graphs.failed:
            return None, f"CUDA graph capture failed earlier for this shape ({graphs.failed[key]})"
        graph = graphs.entries.get(key)
        if graph is not None and not graph.valid():
            graphs.entries.pop(key).close()
            graph = None
        if graph is not None:
            if graph.in_use:
                return None, "the graph of this shape is in use (concurrent or re-entrant generate)"
            graphs.entries.move_to_end(key)
        else:
            graphs.evict(_max_entries() - 1)
            try:
                graph = DecodeGraph(model, key)
                graph.capture()
            except Exception as exc:  # any failure: decode eagerly, say so once
                why = f"{type(exc).__name__}: {exc}"[:500]
                graphs.failed[key] = why
                _warn_once(f"fastgpt: capturing the decode step as a CUDA graph failed ({why}); decoding eagerly")
                return None, f"CUDA graph capture failed ({why})"
            graphs.entries[key] = graph
            graph.just_captured = True
        graph.in_use = True
        return graph, None

    def evict(self, keep: int) -> None:
        """Close the least recently used idle graphs until at most ``keep`` remain."""
        idle = [k for k, g in self.entries.items() if not g.in_use]
        for old_key in idle[: max(len(self.entries) - keep, 0)]:
            self.entries.pop(old_key).close()


def cached_graphs(model) -> list[GraphKey]:
    """The keys of the graphs cached for ``model``, least recently used first."""
    graphs = GraphCache.of(model, create=False)
    return [] if graphs is None else list(graphs.entries)


def clear_graph_cache(model=None) -> None:
    """Free the captured graphs and their state (of ``model``, or of every model), forget
    failed captures and the warnings already shown."""
    if model is None:
        for graphs in list(GraphCache._registry.values()):
            graphs.clear()
        _WARNED.clear()
    else:
        graphs = GraphCache.of(model, create=False)
        if graphs is not None:
            graphs.clear()
