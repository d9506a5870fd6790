"""The eager decode loop behind ``streamer=``, ``output_scores`` and ``output_logits``.

These three need something on the host (or kept) after every token, so they cannot use the
fast loop that syncs only every few steps (or replays a captured CUDA graph). This loop runs
the same model forward and the same next-token choice (``backend.select_next_token``, the same
kernels and RNG stream), with Hugging Face's calls to the streamer:

* ``streamer.put(prompt_ids.cpu())`` once, before the first step (the caller does it, as HF does
  it before generation starts), then ``streamer.put(tokens.cpu())`` with the ``(B,)`` new tokens of
  every step (pad ids for finished rows), then ``streamer.end()``.

Generation stops after the step in which the last row emitted EOS, or after ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as _backend
from .kv_cache import KVCache
from .logits_processors import ProcessorList, recorded_scores


@dataclass
class EagerOutput:
    sequences: torch.Tensor  # (B, T + n)
    scores: tuple[torch.Tensor, ...] | None  # per step (B, V): processed (and, sampling, warped) scores
    logits: tuple[torch.Tensor, ...] | None  # per step (B, V): raw logits in float32


def check_streamer(streamer) -> None:
    """A streamer needs HF's ``put(tensor)`` and ``end()`` methods."""
    if streamer is None:
        return
    for method in ("put", "end"):
        if not callable(getattr(streamer, method, None)):
            raise TypeError(
                f"streamer must have put() and end() methods (transformers' BaseStreamer interface); "
                f"{type(streamer).__name__} has no {method}()"
            )


def eager_decode(
    model,
    input_ids: torch.Tensor,
    cache: KVCache,
    sampling: _backend.SamplingState,
    max_new_tokens: int,
    *,
    eos: torch.Tensor | None,
    pad_token_id: int,
    processors: ProcessorList | None,
    streamer=None,
    output_logits: bool = False,
) -> EagerOutput:
    """Decode ``max_new_tokens`` tokens one host-visible step at a time.

    Parameters
    ----------
    model : fastgpt.GPT
    input_ids : (B, T) int64 on the model's device (the cache's row_start already set).
    cache : an empty KV cache of ``B`` rows and at least ``T + max_new_tokens`` slots.
    sampling : the next-token settings (greedy or sampling) for the ``B`` rows.
    eos : (n_eos,) int64 EOS ids on the device, or None.
    pad_token_id : what a finished row emits.
    processors : started logits processors (min-new-tokens included), or None.
    streamer : object with ``put``/``end`` (HF ``BaseStreamer``), or None.
    output_logits : keep the raw float32 logits of every step.
    """
    B, T = input_ids.shape
    device = input_ids.device
    backend = _backend.resolve_backend(device)
    out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=device)
    out[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    raw: list[torch.Tensor] = []
    tokens = None
    n_done = 0
    while n_done < max_new_tokens:
        if n_done == 0:
            logits = model(input_ids, cache, last_only=True)[:, -1]
        else:
            logits = model(tokens[:, None], cache)[:, -1]
        logits = logits.float()  # HF processes logits in float32
        if output_logits:
            raw.append(logits.clone())
        if processors is not None:
            logits = processors(logits)
        tokens = _backend.select_next_token(logits, sampling, backend)
        if eos is not None:
            tokens = torch.where(finished, pad, tokens)
            finished |= (tokens[:, None] == eos[None, :]).any(dim=1)
        if processors is not None:
            processors.update(tokens)
        out[:, T + n_done] = tokens
        n_done += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if eos is not None and bool(finished.all()):
            break  # HF stops right after the step in which the last row finished
    if streamer is not None:
        streamer.end()
    rec = recorded_scores(processors)
    return EagerOutput(
        sequences=out[:, : T + n_done],
        scores=tuple(rec) if rec is not None else None,
        logits=tuple(raw) if output_logits else None,
    )
