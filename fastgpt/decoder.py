"""The Decoder: one generation's state, and the three things every decode loop does with it.

* :meth:`Decoder.prefill` -- the whole prompt through the model into the KV cache, then the first
  token.
* :meth:`Decoder.step` -- one token: ``(B,)`` last tokens -> ``(B,)`` next tokens.
* :meth:`Decoder.choose` -- ``(B, V)`` logits -> ``(B,)`` tokens: the EOS ban before
  ``min_new_tokens``, the logits processors, the sampler (or argmax), then the EOS -> pad
  bookkeeping of finished rows and the step's counters. Without processors all of it is one
  :func:`fastgpt.backend.select_next_token` call (the Triton sampler's two launches).

Everything :meth:`step` reads or writes that changes from one token to the next is a device tensor
(the cache slot ``cache.pos_tensor``, the RNG step, the number of tokens generated, the finished
flags, the sampler's status flags), so the same method runs eagerly (CPU, CI, the ``torch``
backend) or captured once and replayed as a CUDA graph (:mod:`fastgpt.cuda_graph`, which imports
this module; nothing here imports it back). Its only host-side effect is ``cache.pos += 1``.
:meth:`Decoder.step_into` is the step a graph captures (tokens read from and written into one
buffer); with the Triton backend it is ``1 + 5 x n_layer + 3`` launches at most (embedding,
layers, ln_f + LM head, the sampler), counted by tests/test_launches.py.

The host looks at the device only in :meth:`host_check` (the loops call it rarely): one read that
says whether every row finished, and raises ``RuntimeError`` when the sampler flagged a row
(contract C1: NaN or +inf scores, or every token banned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backend as _backend
from .kv_cache import KVCache

__all__ = ["Decoder", "ban_early_eos", "sampling_failure"]

#: Bits of ``SamplingState.status[:, 0]`` (contract C1) and what they mean.
_FAILURES = {
    1: "the scores contain NaN (HF raises on NaN probabilities when sampling)",
    2: "the scores contain +inf (HF raises on inf probabilities when sampling)",
    4: "every token is banned (HF raises: no token has a non-zero probability)",
}


#: The one implementation of the min_new_tokens EOS ban in PyTorch (the Triton sampler bans inside).
ban_early_eos = _backend.ban_early_eos


def sampling_failure(status: torch.Tensor) -> str | None:
    """The error message for the first row the sampler flagged in ``status`` ``(B, 2)``, or None."""
    rows = status.cpu().tolist()
    for b, (bits, step) in enumerate(rows):
        if bits:
            reasons = "; ".join(text for bit, text in _FAILURES.items() if bits & bit)
            return f"sampling failed in row {b} at step {step}: {reasons}"
    return None


class Decoder:
    """The state of one generation: model, KV cache, sampling state, EOS bookkeeping, processors.

    Parameters
    ----------
    model : fastgpt.GPT
    cache : the KV cache of this generation (``cache.batch`` rows), its ``row_start`` set.
    sampling : per-row sampling settings, seed, RNG step and status flags as device tensors.
    eos_token_ids : ids that end a row, or None.
    pad_token_id : written in place of the token of every row that has finished.
    min_new_tokens : EOS is banned (score ``-inf``) while fewer tokens than this were generated.
    processors : optional started :class:`fastgpt.logits_processors.ProcessorList`: applied after
        the EOS ban, given each step's final tokens through ``update``. Processors hold per-call
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
        self.eos = None if not eos_token_ids else torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self.pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
        # The EOS ban's bound is a device tensor so that a captured step serves any value; whether
        # the ban exists at all is decided on the host (it is part of a graph's shape key).
        self.min_new = torch.full((1,), min_new_tokens, dtype=torch.int64, device=device)
        self.ban_eos_early = self.eos is not None and min_new_tokens > 0
        self.processors = processors
        self.finished = torch.zeros(cache.batch, dtype=torch.bool, device=device)
        self.n_generated = torch.zeros(1, dtype=torch.int64, device=device)
        self._stop = torch.zeros((), dtype=torch.bool, device=device)

    @classmethod
    def create(cls, model, settings, batch: int, max_len: int, *, row_start=None, processors=None) -> "Decoder":
        """A fresh decoder (its own KV cache of ``batch`` x ``max_len``) for these settings.

        ``settings`` is a :class:`fastgpt.settings.GenerationSettings`; ``row_start`` the
        ``(batch,)`` left-pad counts or None.
        """
        sampling = _backend.SamplingState(batch, model.device, **settings.sampling_kwargs)
        cache = model.new_cache(batch, max_len)
        if row_start is not None:
            cache.set_row_start(row_start.to(cache.device))
        return cls(
            model,
            cache,
            sampling,
            eos_token_ids=settings.eos_token_ids,
            pad_token_id=settings.pad_token_id,
            min_new_tokens=settings.min_new_tokens,
            processors=processors,
        )

    # ---- the model ------------------------------------------------------------------------------
    def logits(self, ids: torch.Tensor, *, float32: bool = True, advance_device: bool = True) -> torch.Tensor:
        """``(B, T)`` token ids at the cache's next slots -> ``(B, V)`` logits of the last one.

        With an empty cache this is the prefill. ``float32``: HF processes logits in float32 (the
        Triton sampler reads the model's dtype and converts in registers: no extra launch).
        ``advance_device=False``: the caller advances ``cache.pos_tensor`` (the sampler does).
        """
        last_only = self.cache.pos == 0
        logits = self.model(ids, self.cache, last_only=last_only, advance_device=advance_device)[:, -1]
        return logits.float() if float32 else logits

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the whole ``(B, T)`` prompt, return the first new token ``(B,)``."""
        return self.choose(self.logits(input_ids))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``(B,)`` last tokens -> ``(B,)`` next tokens."""
        return self._step(tokens, out=None)

    def step_into(self, tokens: torch.Tensor) -> None:
        """One decode step in place: reads the ``(B,)`` last tokens from ``tokens`` and writes the
        next ones into it. This is what a CUDA graph captures (the next replay's input is this
        replay's output) and what tests/test_launches.py counts: with the Triton backend and no
        processors, the embedding, the layers, ln_f + LM head and the sampler's two launches,
        which also do the EOS ban, the EOS -> pad bookkeeping, this copy and every counter."""
        self._step(tokens, out=tokens)

    def _step(self, tokens: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        fused = self.backend == "triton" and self.processors is None
        # The sampler advances the cache's device position with the other counters (one launch
        # fewer); the model advances only the host position.
        logits = self.logits(tokens[:, None], float32=not fused, advance_device=False)
        return self.choose(logits, out=out, cache_advance=1)

    # ---- the choice -----------------------------------------------------------------------------
    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` float32 scores (logits, or log-probs in beam search) after the EOS ban and
        the processors. May modify ``scores`` in place."""
        if self.ban_eos_early:
            ban_early_eos(scores, self.eos, self.n_generated, self.min_new)
        if self.processors is not None:
            scores = self.processors(scores)
        return scores

    def record(self, tokens: torch.Tensor) -> None:
        """The ``(B,)`` tokens appended to each row (beam search): processors' state and the token count."""
        if self.processors is not None:
            self.processors.update(tokens)
        self.n_generated += 1

    def choose(self, logits: torch.Tensor, *, out: torch.Tensor | None = None, cache_advance: int = 0) -> torch.Tensor:
        """``(B, V)`` logits -> ``(B,)`` int64 next tokens (pad for finished rows), into ``out``
        when given; advances the RNG step, the token count and ``cache.pos_tensor`` by
        ``cache_advance``, all on the device.

        Without processors everything after the LM head is one call of the sampler
        (:func:`fastgpt.backend.select_next_token` with the step's bookkeeping: two launches with
        the Triton backend). With processors the EOS ban and the processors run first, in PyTorch.
        """
        ban_inside = self.processors is None and self.ban_eos_early
        if not ban_inside:
            logits = self.process(logits)
        book = _backend.StepBookkeeping(
            eos=self.eos, pad=self.pad, finished=self.finished, n_generated=self.n_generated,
            min_new=self.min_new if ban_inside else None, cache_pos=self.cache.pos_tensor, cache_advance=cache_advance,
        )  # fmt: skip
        tokens = _backend.select_next_token(logits, self.sampling, self.backend, book=book, out=out)
        if self.processors is not None:
            self.processors.update(tokens)
        return tokens

    # ---- the host's look ------------------------------------------------------------------------
    @property
    def may_fail(self) -> bool:
        """Whether a row samples (only sampling rows are flagged by the sampler)."""
        return not self.sampling.all_greedy

    def host_check(self) -> bool:
        """One host read: whether every row has finished (False without EOS).

        Raises ``RuntimeError`` (naming the row, the step and the reason) when the sampler
        flagged a row since the generation started.
        """
        if self.eos is not None:
            torch.all(self.finished, out=self._stop)  # into a preallocated flag
        if self.may_fail:
            failed = (self.sampling.status[:, 0] != 0).any()
            stop = self._stop | failed if self.eos is not None else failed
        else:
            stop = self._stop
        if not bool(stop):
            return False
        if self.may_fail:
            message = sampling_failure(self.sampling.status)
            if message is not None:
                raise RuntimeError(message)
        return True

    def steps_until_all_finished(self, new_tokens: torch.Tensor) -> int:
        """Tokens Hugging Face would have generated of ``new_tokens`` ``(B, n)``: up to the step in
        which the last row emitted EOS (the fast loop looks only every few steps). A host read."""
        hit = (new_tokens[:, :, None] == self.eos).any(dim=-1)  # (B, n)
        first_hit = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), new_tokens.shape[1])  # (B,)
        return min(int(first_hit.max()) + 1, new_tokens.shape[1])
