"""The streaming loop: behind ``streamer=``, ``output_scores`` and ``output_logits``.

These need something on the host (or kept) after every token, so they cannot use the fast loop
that looks at the device only every few steps (or replays a captured CUDA graph). This loop runs
the same :class:`fastgpt.decoder.Decoder` (the same model forward, EOS ban, processors, sampler
and RNG stream), with Hugging Face's calls to the streamer:

* ``streamer.put(prompt_ids.cpu())`` once, before the first step (the caller does it, as HF does
  it before generation starts), then ``streamer.put(tokens.cpu())`` with the ``(B,)`` new tokens of
  every step (pad ids for finished rows), then ``streamer.end()``.

Generation stops after the step in which the last row emitted EOS, or after ``max_new_tokens``.
The sampler's failure flags are read at every step (:meth:`Decoder.host_check`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import Decoder
from .logits_processors import recorded_scores

__all__ = ["StreamOutput", "stream_decode"]


@dataclass
class StreamOutput:
    sequences: torch.Tensor  # (B, T + n)
    scores: tuple[torch.Tensor, ...] | None  # per step (B, V): processed (and, sampling, warped) scores
    logits: tuple[torch.Tensor, ...] | None  # per step (B, V): raw logits in float32
    decode_steps: int  # steps after the prefill


def stream_decode(
    decoder: Decoder, input_ids: torch.Tensor, max_new_tokens: int, *, streamer=None, output_logits: bool = False
) -> StreamOutput:
    """Decode up to ``max_new_tokens`` tokens after ``input_ids`` ``(B, T)``, one host-visible step
    at a time.

    ``decoder`` is fresh (empty cache) with any processors started; ``streamer`` has HF's
    ``put``/``end`` (or is None); ``output_logits`` keeps the raw float32 logits of every step.
    """
    B, T = input_ids.shape
    out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=input_ids.device)
    out[:, :T] = input_ids
    raw: list[torch.Tensor] = []
    check = decoder.eos is not None or decoder.may_fail
    tokens = input_ids
    n_done = 0
    while n_done < max_new_tokens:
        logits = decoder.logits(input_ids if n_done == 0 else tokens[:, None])
        if output_logits:
            raw.append(logits.clone())
        tokens = decoder.choose(logits)
        out[:, T + n_done] = tokens
        n_done += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if check and decoder.host_check():
            break  # HF stops right after the step in which the last row finished
    if streamer is not None:
        streamer.end()
    rec = recorded_scores(decoder.processors)
    return StreamOutput(
        sequences=out[:, : T + n_done],
        scores=tuple(rec) if rec is not None else None,
        logits=tuple(raw) if output_logits else None,
        decode_steps=max(n_done - 1, 0),
    )
