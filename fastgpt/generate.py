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

from collections.abc import Sequence

import torch

from . import backend as _backend
from .kv_cache import KVCache

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
    head, logits processing and the next-token choice, on device tensors only.
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
    ) -> None:
        self.model, self.cache, self.sampling = model, cache, sampling
        device = cache.device
        self.backend = _backend.resolve_backend(device)
        self.eos = None if eos_token_ids is None else torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
        self.min_new_tokens = min_new_tokens
        self.finished = torch.zeros(cache.batch, dtype=torch.bool, device=device)
        self.n_generated = torch.zeros(1, dtype=torch.int64, device=device)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the whole prompt, return the first new token ``(B,)``."""
        logits = self.model(input_ids, self.cache, last_only=True)[:, -1]
        return self._choose(logits)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``(B,)`` last tokens -> ``(B,)`` next tokens."""
        logits = self.model(tokens[:, None], self.cache)[:, -1]
        return self._choose(logits)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # HF processes logits in float32
        if self.eos is not None and self.min_new_tokens > 0:
            # EOS is forbidden before min_new_tokens, decided on the device (no host step index).
            ban = torch.where(self.n_generated < self.min_new_tokens, float("-inf"), 0.0)  # (1,)
            logits[:, self.eos] += ban
        tokens = _backend.select_next_token(logits, self.sampling, self.backend)
        if self.eos is not None:
            tokens = torch.where(self.finished, self.pad, tokens)
            self.finished |= torch.isin(tokens, self.eos)
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
) -> torch.Tensor:
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

    Returns
    -------
    (B, T + n) int64 tensor, ``n <= max_new_tokens`` (fewer when every row hit EOS).
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
    eos_ids = _token_list(eos_token_id, "eos_token_id", config.vocab_size)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    else:
        _check_int(pad_token_id, "pad_token_id", 0, config.vocab_size - 1)
    row_start = left_padding(attention_mask, input_ids)

    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    cache = model.new_cache(B, T + max_new_tokens)
    if row_start is not None:
        cache.set_row_start(row_start.to(device))
    sampling = _backend.SamplingState(
        B,
        device,
        temperature=0.0 if greedy else float(temperature),
        top_k=0 if greedy or top_k is None else top_k,
        top_p=1.0 if greedy or top_p is None else float(top_p),
        min_p=0.0 if greedy or min_p is None else float(min_p),
        seed=seed,
    )
    decoder = Decoder(
        model, cache, sampling, eos_token_ids=eos_ids, pad_token_id=pad_token_id, min_new_tokens=min_new_tokens
    )
    out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=device)
    out[:, :T] = input_ids
    return _decode_loop(decoder, input_ids, out, max_new_tokens)


def _decode_loop(decoder: Decoder, input_ids: torch.Tensor, out: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    T = input_ids.shape[1]
    tokens = decoder.prefill(input_ids)
    out[:, T] = tokens
    n_done = 1
    while n_done < max_new_tokens:
        if decoder.eos is not None and n_done % SYNC_EVERY == 0 and bool(decoder.finished.all()):
            break  # the only host sync: every SYNC_EVERY tokens, and only when EOS can end rows
        tokens = decoder.step(tokens)
        out[:, T + n_done] = tokens
        n_done += 1
    if decoder.eos is not None:
        n_done = _trim_after_all_finished(out[:, T : T + n_done], decoder.eos)
    return out[:, : T + n_done]


def _trim_after_all_finished(new_tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """Number of steps Hugging Face would have run: up to the step where the last row hit EOS."""
    hit = torch.isin(new_tokens, eos)  # (B, n)
    first_hit = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), new_tokens.shape[1])  # (B,)
    last_row_done = int(first_hit.max())
    return min(last_row_done + 1, new_tokens.shape[1])

