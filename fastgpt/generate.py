"""generate(): one prefill of the prompt, then one token per step through the preallocated KV cache.

Semantics follow Hugging Face ``generate``: greedy when ``do_sample=False`` (whatever the
temperature) or when ``temperature == 0``; sampling applies temperature -> top-k -> top-p -> min-p;
rows that emitted an EOS token are filled with ``pad_token_id`` afterwards, and generation stops
once every row has finished. Left-padded batches (``attention_mask`` with zeros on the left) give,
row by row, the tokens each row would get alone.

The per-token work lives in :class:`Decoder.step`, which touches only device tensors (token ids,
the cache position, the RNG step, the finished flags), so it runs the same eagerly or replayed from
a captured CUDA graph. The host looks at the finished flags every ``sync_every`` steps, not every
token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import backend as _backend
from . import reference
from .beam_search import beam_search
from .kv_cache import KVCache
from .logits_processors import build_processors
from .streaming import check_streamer, eager_decode

#: How many decode steps run between two host checks of "has every row finished?".
SYNC_EVERY = 16


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _token_list(value, name: str, vocab_size: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [value] if isinstance(value, int) else list(value)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        _check_int(v, name, 0, vocab_size - 1)
    return values


def left_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``(B,)`` int32 count of leading pad tokens per row, or None when there is no padding.

    Only left padding is supported (zeros, then ones): that is what decoder-only generation uses.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to("cpu")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    mask = mask.to(torch.int32)
    n_pad = (mask == 0).sum(dim=1)
    T = mask.shape[1]
    if bool((n_pad == T).any()):
        raise ValueError("attention_mask has a row with no real token (all zeros)")
    expected = (torch.arange(T)[None, :] >= n_pad[:, None]).to(torch.int32)
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must be left-padded: each row zeros first, then ones (pad on the left)")
    if not bool(n_pad.any()):
        return None
    return n_pad.to(torch.int32)


class Decoder:
    """The state of one generation: model, KV cache, sampling state, EOS bookkeeping.

    :meth:`step` is the single-token decode step: embedding, every layer, final LayerNorm, LM
    head, logits processing and the next-token choice, on device tensors only. Nothing in it
    reads a host value that changes from one step to the next (the cache slot, the RNG step, the
    number of tokens generated, the finished flags are all device tensors), so
    :mod:`fastgpt.cuda_graph` captures it once and replays it; eagerly it runs as is (CPU, CI,
    the ``torch`` backend).

    Parameters
    ----------
    model : fastgpt.GPT
    cache : the KV cache of this generation (``cache.batch`` rows).
    sampling : per-row sampling settings, seed and RNG step as device tensors.
    eos_token_ids : ids that end a row, or None.
    pad_token_id : written in place of the token of every row that has finished.
    min_new_tokens : EOS is banned (logit ``-inf``) while fewer tokens than this were generated.
    processors : optional :class:`fastgpt.logits_processors.ProcessorList` (already started by
        the caller): called on the float32 logits after the EOS ban, and given each step's final
        tokens (after the EOS -> pad replacement) through ``update``. Processors hold per-call
        state, so a decoder with processors decodes eagerly (no CUDA graph).
    """

    def __init__(
        self,
        model,
        cache: KVCache,
        sampling: _backend.SamplingState,
        *,
        eos_token_ids: Sequence[int] | None,
        pad_token_id: int,
        min_new_tokens: int,
        processors=None,
    ) -> None:
        self.model, self.cache, self.sampling = model, cache, sampling
        device = cache.device
        self.backend = _backend.resolve_backend(device)
        self.eos = (
            None
            if eos_token_ids is None or len(eos_token_ids) == 0
            else torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        )
        self.pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
        self.min_new_tokens = min_new_tokens
        # The EOS ban's bound is a device tensor so that a captured step serves any value; whether
        # the ban exists at all is decided on the host (it is part of a graph's shape key).
        self.min_new = torch.full((1,), min_new_tokens, dtype=torch.int64, device=device)
        self.ban_eos_early = self.eos is not None and min_new_tokens > 0
        self.processors = processors
        self.finished = torch.zeros(cache.batch, dtype=torch.bool, device=device)
        self.n_generated = torch.zeros(1, dtype=torch.int64, device=device)
        self._all_finished = torch.zeros((), dtype=torch.bool, device=device)
        #: The :class:`fastgpt.cuda_graph.DecodeGraph` owning this decoder's state, when it has one.
        self.graph = None

    @classmethod
    def create(
        cls,
        model,
        batch: int,
        max_len: int,
        *,
        row_start: torch.Tensor | None = None,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        seed: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int = 0,
        min_new_tokens: int = 0,
        processors=None,
    ) -> "Decoder":
        """The decoder of one generation of ``batch`` rows of up to ``max_len`` tokens.

        When the decode step runs as a CUDA graph (see :mod:`fastgpt.cuda_graph`), this returns
        the persistent decoder the cached graph owns for this shape, reset in place and loaded
        with these settings: no KV cache is allocated per call. Otherwise a fresh one. The
        arguments are validated host values (``generate()`` checks them); ``row_start`` is the
        ``(batch,)`` count of left-pad tokens per row, or None.
        """
        sampling = _backend.SamplingState(
            batch, model.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
        )
        if processors is None:
            from . import cuda_graph

            decoder = cuda_graph.persistent_decoder(
                model,
                batch,
                max_len,
                sampling=sampling,
                row_start=row_start,
                eos_token_ids=eos_token_ids,
                pad_token_id=pad_token_id,
                min_new_tokens=min_new_tokens,
            )
            if decoder is not None:
                return decoder
        cache = model.new_cache(batch, max_len)
        if row_start is not None:
            cache.set_row_start(row_start.to(cache.device))
        return cls(
            model,
            cache,
            sampling,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
            processors=processors,
        )

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the whole prompt, return the first new token ``(B,)``."""
        logits = self.model(input_ids, self.cache, last_only=True)[:, -1]
        return self._choose(logits)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``(B,)`` last tokens -> ``(B,)`` next tokens."""
        logits = self.model(tokens[:, None], self.cache)[:, -1]
        return self._choose(logits)

    def all_finished(self) -> bool:
        """Whether every row has emitted EOS. A host sync: the decode loop calls it rarely."""
        torch.all(self.finished, out=self._all_finished)  # into a preallocated flag: no allocation
        return bool(self._all_finished)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # HF processes logits in float32
        if self.ban_eos_early:
            # EOS is forbidden before min_new_tokens, decided on the device (no host step index).
            # index_select/index_copy_ on the (B, n_eos) EOS columns: no host sync, capturable.
            eos_logits = logits.index_select(1, self.eos)  # (B, n_eos)
            early = self.n_generated < self.min_new  # (1,)
            logits.index_copy_(1, self.eos, torch.where(early, float("-inf"), eos_logits))
        if self.processors is not None:
            logits = self.processors(logits)
        tokens = _backend.select_next_token(logits, self.sampling, self.backend)
        if self.eos is not None:
            tokens = torch.where(self.finished, self.pad, tokens)
            # (B, 1) == (1, n_eos): membership without torch.isin (whose CUDA path may sort).
            self.finished |= (tokens[:, None] == self.eos[None, :]).any(dim=1)
        if self.processors is not None:
            self.processors.update(tokens)
        self.n_generated += 1
        return tokens


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    min_new_tokens: int = 0,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    streamer=None,
    output_scores: bool = False,
    output_logits: bool = False,
    return_dict_in_generate: bool = False,
):
    """Generate ``max_new_tokens`` tokens after ``input_ids``, as Hugging Face ``generate`` does.

    Parameters
    ----------
    model : fastgpt.GPT
    input_ids : (B, T) integer tensor of token ids (a 1-D tensor is taken as one row).
    max_new_tokens : number of tokens to generate; ``T + max_new_tokens <= n_positions``.
    do_sample : sample instead of greedy decoding. ``temperature == 0`` also means greedy.
    temperature : > 0 for sampling (0: greedy).
    top_k : keep the ``top_k`` most likely tokens (>= 1), or None for all.
    top_p : nucleus sampling, in (0, 1]; None or 1.0 for all.
    min_p : keep tokens with ``p >= min_p * p_max``, in [0, 1]; None for all.
    attention_mask : (B, T) of 0/1, zeros on the left for padded rows.
    eos_token_id : an id or a list of ids that end a row.
    pad_token_id : fills a row after its EOS; defaults to the first EOS id.
    min_new_tokens : EOS is not allowed before this many new tokens.
    seed : makes sampling reproducible (same seed, same tokens).
    repetition_penalty : > 0; HF's penalty on every token already in the row (1.0: off).
    no_repeat_ngram_size : >= 0; no n-gram of this size appears twice in a row (0: off).
    num_beams : >= 1; beam search when > 1 (greedy only: ``do_sample`` must be off).
    length_penalty : beam search: finished hypotheses score ``sum_logprob / length ** length_penalty``.
    early_stopping : beam search: True, False or "never", HF's stopping rules.
    num_return_sequences : rows returned per prompt: <= num_beams for beam search, any >= 1 when
        sampling, 1 for greedy decoding (as HF).
    streamer : an object with HF's ``put(tensor)`` / ``end()`` (e.g. ``transformers.TextStreamer``);
        gets the prompt, then each step's ``(B,)`` tokens, then ``end()``. Not with beam search.
    output_scores, output_logits : keep the processed scores / raw logits of every step
        (returned only with ``return_dict_in_generate``).
    return_dict_in_generate : return transformers' ``GenerateDecoderOnlyOutput`` (or
        ``GenerateBeamDecoderOnlyOutput`` for beam search) instead of the tensor; needs transformers.

    Returns
    -------
    (B * num_return_sequences, T + n) int64 tensor, ``n <= max_new_tokens`` (fewer when every row
    hit EOS, or when beam search stopped early), or the HF output object described above.
    """
    config = model.config
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    _check_int(max_new_tokens, "max_new_tokens", 1)
    if T + max_new_tokens > config.n_positions:
        raise ValueError(
            f"prompt length ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds the "
            f"model's n_positions ({config.n_positions}); allowed: max_new_tokens <= {config.n_positions - T}"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"input_ids must be token ids in [0, {config.vocab_size - 1}], found values in [{lo}, {hi}]")
    _check_int(min_new_tokens, "min_new_tokens", 0)

    greedy = not do_sample or temperature == 0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        _check_int(top_k, "top_k", 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if (
        isinstance(repetition_penalty, bool)
        or not isinstance(repetition_penalty, (int, float))
        or not repetition_penalty > 0
        or repetition_penalty == float("inf")
    ):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: off), got {repetition_penalty!r}")
    _check_int(no_repeat_ngram_size, "no_repeat_ngram_size", 0)
    _check_int(num_beams, "num_beams", 1)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ValueError(f"length_penalty must be a real number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or (isinstance(early_stopping, str) and early_stopping == "never")):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    _check_int(num_return_sequences, "num_return_sequences", 1)
    if num_beams > 1:
        if not greedy:
            raise ValueError(
                "beam search with do_sample=True (beam sampling) is not supported: use num_beams=1 to sample, "
                "or do_sample=False for beam search"
            )
        if num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences must be in [1, num_beams={num_beams}] for beam search, got {num_return_sequences}"
            )
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (as in transformers): use num_beams=1")
    elif greedy and num_return_sequences > 1:
        raise ValueError(
            f"greedy decoding returns one sequence per prompt: num_return_sequences must be 1, got "
            f"{num_return_sequences} (use do_sample=True or num_beams > 1)"
        )
    check_streamer(streamer)
    eos_ids = _token_list(eos_token_id, "eos_token_id", config.vocab_size)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    else:
        _check_int(pad_token_id, "pad_token_id", 0, config.vocab_size - 1)
    row_start = left_padding(attention_mask, input_ids)

    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if num_beams == 1 and num_return_sequences > 1:
        # Sampling several sequences per prompt: each prompt row repeated, as HF expands it.
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)  # (B * nrs, T)
        if row_start is not None:
            row_start = row_start.repeat_interleave(num_return_sequences)
        B = input_ids.shape[0]
    if streamer is not None:
        streamer.put(input_ids.cpu())

    if num_beams > 1:
        processors = build_processors(
            vocab_size=config.vocab_size,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens,
            eos_token_ids=eos_ids,
            record_scores=output_scores and return_dict_in_generate,
        )
        result = beam_search(
            model,
            input_ids,
            max_new_tokens,
            num_beams=num_beams,
            row_start=row_start,
            eos_token_ids=eos_ids,
            pad_token_id=pad_token_id,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            processors=processors,
            output_logits=output_logits and return_dict_in_generate,
        )
        if not return_dict_in_generate:
            return result.sequences
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        return GenerateBeamDecoderOnlyOutput(
            sequences=result.sequences,
            sequences_scores=result.sequences_scores if output_scores else None,
            scores=result.scores,
            logits=result.logits,
            beam_indices=result.beam_indices,
        )

    settings = dict(  # greedy rows: temperature 0, no filters
        temperature=0.0 if greedy else float(temperature),
        top_k=0 if greedy or top_k is None else top_k,
        top_p=1.0 if greedy or top_p is None else float(top_p),
        min_p=0.0 if greedy or min_p is None else float(min_p),
        seed=seed,
    )
    want_scores = output_scores and return_dict_in_generate
    want_logits = output_logits and return_dict_in_generate
    if streamer is not None or want_scores or want_logits:
        # Something is needed on the host (or kept) every step: the eager loop.
        warp = None
        if want_scores and not greedy:
            # HF reports sampling scores after its warpers: temperature, top-k, top-p, min-p.
            warp = functools.partial(
                reference.filter_logits,
                temperature=settings["temperature"],
                top_k=settings["top_k"],
                top_p=settings["top_p"],
                min_p=settings["min_p"],
            )
        processors = build_processors(
            vocab_size=config.vocab_size,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens,
            eos_token_ids=eos_ids,
            record_scores=want_scores,
            warp=warp,
        )
        if processors is not None:
            processors.start(input_ids, T + max_new_tokens)
        cache = model.new_cache(B, T + max_new_tokens)
        if row_start is not None:
            cache.set_row_start(row_start.to(device))
        result = eager_decode(
            model,
            input_ids,
            cache,
            _backend.SamplingState(B, device, **settings),
            max_new_tokens,
            eos=None if eos_ids is None else torch.tensor(eos_ids, dtype=torch.long, device=device),
            pad_token_id=pad_token_id,
            processors=processors,
            streamer=streamer,
            output_logits=want_logits,
        )
        sequences, scores, logits = result.sequences, result.scores, result.logits
    else:
        # The fast loop (CUDA graph when available). Repetition penalty and no-repeat n-gram ride
        # on the decoder as processors; min_new_tokens is the decoder's own EOS ban.
        processors = build_processors(
            vocab_size=config.vocab_size,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        if processors is not None:
            processors.start(input_ids, T + max_new_tokens)
        decoder = Decoder.create(
            model,
            B,
            T + max_new_tokens,
            row_start=row_start,
            eos_token_ids=eos_ids,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
            processors=processors,
            **settings,
        )
        out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=device)
        out[:, :T] = input_ids
        sequences = _decode_loop(decoder, input_ids, out, max_new_tokens)
        scores = logits = None
    if not return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)


def _decode_loop(decoder: Decoder, input_ids: torch.Tensor, out: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Prefill, then up to ``max_new_tokens - 1`` decode steps into ``out`` ``(B, T + max_new_tokens)``.

    The steps replay a captured CUDA graph when :mod:`fastgpt.cuda_graph` provides one for this
    decoder's shape (the decoder's settings are then copied into the graph's persistent state,
    unless ``decoder`` already is that state, see :meth:`Decoder.create`), else run eagerly.
    Per token the host only launches work: it reads the device back every ``SYNC_EVERY`` steps,
    and only when EOS can end rows. Returns ``out[:, :T + n]``, ``n`` the number of steps
    Hugging Face would have run.
    """
    from . import cuda_graph

    graph = decoder.graph
    reason = None
    if graph is None:
        if max_new_tokens > 1:
            graph, reason = cuda_graph.bind(decoder)
        else:
            reason = "a single new token: no decode step"
    stats = cuda_graph.begin_generate_stats(graph, reason)
    active = graph.decoder if graph is not None else decoder
    T = input_ids.shape[1]
    n_done = 0
    try:
        tokens = active.prefill(input_ids)
        out[:, T] = tokens
        n_done = 1
        step = graph.step if graph is not None else active.step
        check_eos = active.eos is not None
        while n_done < max_new_tokens:
            if check_eos and n_done % SYNC_EVERY == 0 and active.all_finished():
                break  # the only host sync: every SYNC_EVERY tokens, and only when EOS can end rows
            tokens = step(tokens)
            out[:, T + n_done] = tokens  # a copy into a view of `out`: nothing allocated per token
            n_done += 1
        if check_eos:
            n_done = _trim_after_all_finished(out[:, T : T + n_done], active.eos)
    finally:
        if graph is not None:
            graph.release()
        stats["decode_steps"] = max(n_done - 1, 0)
    return out[:, : T + n_done]


def _trim_after_all_finished(new_tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """Number of steps Hugging Face would have run: up to the step where the last row hit EOS."""
    hit = torch.isin(new_tokens, eos)  # (B, n)
    first_hit = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), new_tokens.shape[1])  # (B,)
    last_row_done = int(first_hit.max())
    return min(last_row_done + 1, new_tokens.shape[1])

