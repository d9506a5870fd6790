"""generate(): settings -> decoder -> one of three loops, as Hugging Face ``generate`` does.

Top-down: :func:`generate` checks the prompt and builds one :class:`~fastgpt.settings.GenerationSettings`
(the only place arguments are checked); :func:`run` picks the loop:

* beam search (``num_beams > 1``): :func:`fastgpt.beam_search.beam_search`;
* the streaming loop (a streamer, ``output_scores`` or ``output_logits``: the host needs every
  token): :func:`fastgpt.streaming.stream_decode`;
* the fast loop, below: :meth:`Decoder.prefill`, then one :meth:`Decoder.step` per token -- the
  replay of a captured CUDA graph when :mod:`fastgpt.cuda_graph` provides one -- with the host
  looking at the device only every ``SYNC_EVERY`` steps, and only when EOS can end rows.

All three run on a :class:`~fastgpt.decoder.Decoder` (prefill, EOS ban, processors, sampler, EOS ->
pad bookkeeping). Semantics: greedy when ``do_sample=False`` or ``temperature == 0``; sampling
applies temperature -> top-k -> top-p -> min-p; rows that emitted EOS are filled with
``pad_token_id``; generation stops once every row has finished. Left-padded batches give, row by
row, the tokens each row would get alone. Returned tensors are ordinary tensors (no autograd
graph, not inference tensors).
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .beam_search import beam_search
from .cuda_graph import GraphCache
from .decoder import Decoder
from .kv_cache import bucket_length
from .logits_processors import processors_for
from .settings import GenerationSettings, check_prompt
from .streaming import stream_decode

__all__ = ["generate", "run", "SYNC_EVERY"]

#: How many decode steps run between two host checks of "has every row finished?".
SYNC_EVERY = 16


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None, **options):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``, as Hugging Face ``generate`` does.

    Parameters
    ----------
    model : fastgpt.GPT (for a transformers model, use ``fastgpt.accelerate(hf_model).generate``).
    input_ids : (B, T) integer tensor of token ids (a 1-D tensor is taken as one row).
    max_new_tokens : number of tokens to generate; ``T + max_new_tokens <= n_positions`` (and within a sliding window).
    attention_mask : (B, T) of 0/1, zeros on the left for padded rows.
    **options : HF's generation arguments, checked by :meth:`GenerationSettings.create`:
        ``do_sample``, ``temperature`` (finite, > 0 to sample; 0: greedy), ``top_k`` (>= 1),
        ``top_p`` (in (0, 1]), ``min_p`` (in [0, 1]), ``seed`` (an int64), ``eos_token_id`` (an id
        or a list), ``pad_token_id`` (default: the first EOS id), ``min_new_tokens``,
        ``repetition_penalty`` (> 0; left-pad slots are not penalised), ``no_repeat_ngram_size``,
        ``num_beams`` (beam search when > 1, greedy only), ``length_penalty``, ``early_stopping``
        (True, False or "never"), ``num_return_sequences``, ``streamer`` (HF's ``put``/``end``;
        not with beam search), ``output_scores``, ``output_logits``, ``return_dict_in_generate``.

    Returns
    -------
    (B * num_return_sequences, T + n) int64 tensor, ``n <= max_new_tokens`` (fewer when every row
    hit EOS or beam search stopped early), or with ``return_dict_in_generate`` transformers'
    ``GenerateDecoderOnlyOutput`` / ``GenerateBeamDecoderOnlyOutput``.

    Raises
    ------
    TypeError / ValueError : bad arguments, before any work. RuntimeError : a sampled row's scores
        held NaN or +inf, or every token was banned (as HF).
    """
    if not hasattr(model, "new_cache"):
        raise TypeError(
            f"fastgpt.generate takes a fastgpt GPT model, got {type(model).__name__}; for a transformers "
            "model use fastgpt.accelerate(hf_model).generate(...)"
        )
    input_ids, row_start = check_prompt(input_ids, attention_mask, model.config.vocab_size)
    settings = GenerationSettings.create(model.config, input_ids.shape[1], max_new_tokens, **options)
    return run(model, settings, input_ids, row_start)


def run(model, settings: GenerationSettings, input_ids: torch.Tensor, row_start: torch.Tensor | None):
    """Generate with checked ``settings`` from a checked ``(B, T)`` prompt (``fastgpt.accelerate``
    enters here). The work runs in inference mode (fewer dispatcher layers per op); what is
    returned is copied out of it, so that users may modify it in place or use it with autograd."""
    with torch.inference_mode():
        result = _run(model, settings, input_ids, row_start)
    if isinstance(result, torch.Tensor):
        return result.clone()
    for name, value in result.items():  # an HF ModelOutput
        result[name] = value.clone() if isinstance(value, torch.Tensor) else tuple(v.clone() for v in value)
    return result


def _run(model, settings: GenerationSettings, input_ids: torch.Tensor, row_start: torch.Tensor | None):
    """Expand rows, then beam search, the streaming loop or the fast loop."""
    input_ids = input_ids.to(device=model.device, dtype=torch.long)
    if settings.num_beams == 1 and settings.num_return_sequences > 1:
        # Sampling several sequences per prompt: each prompt row repeated, as HF expands it.
        input_ids = input_ids.repeat_interleave(settings.num_return_sequences, dim=0)  # (B * nrs, T)
        row_start = None if row_start is None else row_start.repeat_interleave(settings.num_return_sequences)
    if settings.streamer is not None:
        settings.streamer.put(input_ids.cpu())
    if settings.num_beams > 1:
        stats = _backend.record_generate(
            loop="beam", path="eager", captured=False, capture_s=0.0, reason="beam search", key=None
        )
        result = beam_search(model, settings, input_ids, row_start)
        stats["decode_steps"] = result.n_steps - 1
        return result.to_hf() if settings.return_dict_in_generate else result.sequences
    B, T = input_ids.shape
    processors = processors_for(settings, model.config.vocab_size, input_ids, row_start)
    if settings.per_step_host_work:
        stats = _backend.record_generate(
            loop="streaming", path="eager", captured=False, capture_s=0.0, reason="the host needs every token", key=None
        )
        cache_len = bucket_length(T + settings.max_new_tokens, model.config.max_context)
        decoder = Decoder.create(model, settings, B, cache_len, row_start=row_start, processors=processors)
        result = stream_decode(decoder, input_ids, settings.max_new_tokens, streamer=settings.streamer,
                               output_logits=settings.output_logits)  # fmt: skip
        stats["decode_steps"] = result.decode_steps
        sequences, scores, logits = result.sequences, result.scores, result.logits
    else:
        sequences, scores, logits = _fast(model, settings, input_ids, row_start, processors), None, None
    if not settings.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)


def _fast(model, settings: GenerationSettings, input_ids: torch.Tensor, row_start, processors) -> torch.Tensor:
    """The fast loop, on the captured graph of this shape when there is one, else eagerly.

    Both paths size the KV cache to the bucket of ``T + n_new`` (:func:`bucket_length`): one
    graph serves every call whose length falls in that bucket, and the eager path, with the same
    cache length, runs the attention with the same split count (bit-for-bit the same tokens).
    """
    B, T = input_ids.shape
    n_new = settings.max_new_tokens
    cache_len = bucket_length(T + n_new, model.config.max_context)
    graph, reason = None, "logits processors hold per-call state"
    if processors is None:
        if n_new == 1:
            reason = "a single new token: no decode step"
        else:
            graph, reason = GraphCache.graph_for(model, settings, B, cache_len, row_start)
    if graph is not None:
        decoder, step = graph.decoder, graph.step
    else:
        decoder = Decoder.create(model, settings, B, cache_len, row_start=row_start, processors=processors)
        step = decoder.step
    captured = graph is not None and graph.just_captured
    stats = _backend.record_generate(
        loop="fast", path="graph" if graph is not None else "eager", captured=captured,
        capture_s=graph.capture_s if captured else 0.0, reason=reason, key=graph.key if graph is not None else None,
    )  # fmt: skip
    if graph is not None:
        graph.just_captured = False
    out = torch.empty((B, T + n_new), dtype=torch.long, device=input_ids.device)
    out[:, :T] = input_ids
    try:
        n_done = _decode_loop(decoder, step, input_ids, out, n_new)
    finally:
        if graph is not None:
            graph.release()
    stats["decode_steps"] = n_done - 1
    return out[:, : T + n_done]


def _decode_loop(decoder: Decoder, step, input_ids: torch.Tensor, out: torch.Tensor, max_new_tokens: int) -> int:
    """Prefill, then up to ``max_new_tokens - 1`` steps into ``out`` ``(B, T + max_new_tokens)``;
    returns ``n``, the number of tokens Hugging Face would have generated.

    Per token the host only launches work: it reads the device back every ``SYNC_EVERY`` steps,
    and only when EOS can end rows; a sampling call's failure flags are read then and at the end.
    """
    T = input_ids.shape[1]
    tokens = decoder.prefill(input_ids)
    out[:, T] = tokens
    n_done = 1
    check_eos = decoder.eos is not None
    while n_done < max_new_tokens:
        if check_eos and n_done % SYNC_EVERY == 0 and decoder.host_check():
            break  # the only host sync: every SYNC_EVERY tokens, and only when EOS can end rows
        tokens = step(tokens)
        out[:, T + n_done] = tokens  # a copy into a view of `out`: nothing allocated per token
        n_done += 1
    if decoder.may_fail:
        decoder.host_check()  # raises when a row's sampling failed
    if check_eos:
        n_done = decoder.steps_until_all_finished(out[:, T : T + n_done])
    return n_done
