"""Hugging Face's logits processors, on device tensors: no host sync per token, fixed shapes.

Each processor reproduces one ``transformers`` processor exactly (same values, so greedy and beam
search pick the same tokens and ``output_scores`` match):

* :class:`RepetitionPenalty` -- ``RepetitionPenaltyLogitsProcessor``: for every token id already in
  the row (prompt included), ``s -> s * penalty`` where ``s < 0`` and ``s -> s / penalty``
  otherwise. The pad slots of a left-padded prompt are not tokens of the row and are not
  penalised (newer transformers; 5.17 penalises them: pass no ``row_start`` to get that).
* :class:`NoRepeatNGram` -- ``NoRepeatNGramLogitsProcessor``: a token that would complete an
  ``n``-gram already present in the row gets ``-inf``.
* :class:`ScoresRecorder` -- not a processor: keeps a copy of the processed scores of every step
  (``output_scores``), optionally passed through the sampling warpers first.

Where HF rebuilds its state from the whole ``input_ids`` every step, these keep it incrementally:
a ``(R, V)`` "seen" mask, a ``(R, L_max)`` token history and a device step counter, all
preallocated by :meth:`start`. Every processor has the same four methods:

``start(input_ids, max_len, vocab_size, row_start=None)``
    ``(R, T)`` prompt rows (``R`` = batch, or batch * num_beams), ``max_len`` = T + max_new_tokens,
    ``row_start`` ``(R,)`` the left-pad slots of each row to leave out, or None.
``__call__(scores) -> scores``
    ``(R, V)`` float32 scores of the next token; may modify ``scores`` in place and return it.
``update(tokens)``
    ``(R,)`` int64 tokens appended to each row (after EOS -> pad replacement, as HF appends them).
``reorder(rows)``
    ``(R,)`` int64: row ``r`` continues row ``rows[r]`` (beam search), before ``update``.

``graph_safe`` says whether a processor can run inside a captured CUDA graph: only device
tensors of fixed shape, no Python-side state that changes per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from . import reference

__all__ = [
    "LogitsProcessor",
    "ProcessorList",
    "RepetitionPenalty",
    "NoRepeatNGram",
    "ScoresRecorder",
    "build_processors",
    "processors_for",
    "recorded_scores",
]


class LogitsProcessor:
    """Base class: a stateless processor needs only ``__call__``."""

    graph_safe = True

    def start(  # noqa: B027 - optional hook
        self, input_ids: torch.Tensor, max_len: int, vocab_size: int, row_start: torch.Tensor | None = None
    ) -> None:
        pass

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, tokens: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def reorder(self, rows: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass


class RepetitionPenalty(LogitsProcessor):
    """HF ``repetition_penalty``: divide positive / multiply negative scores of every seen token.

    Parameters
    ----------
    penalty : float > 0; 1.0 is a no-op (callers skip it), > 1 discourages repeats.
    """

    def __init__(self, penalty: float) -> None:
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.seen: torch.Tensor | None = None

    def start(
        self, input_ids: torch.Tensor, max_len: int, vocab_size: int, row_start: torch.Tensor | None = None
    ) -> None:
        # (R, V) bool: token v occurs in row r. Duplicates in the prompt are one entry, as HF's
        # gather/scatter (which writes the same penalised value for each duplicate). Pad slots
        # (before row_start) point at a spare column V, dropped afterwards.
        R, T = input_ids.shape
        ids = input_ids
        if row_start is not None:
            is_pad = torch.arange(T, device=ids.device)[None, :] < row_start.to(ids.device)[:, None]  # (R, T)
            ids = ids.masked_fill(is_pad, vocab_size)
        seen = torch.zeros((R, vocab_size + 1), dtype=torch.bool, device=ids.device)
        seen.scatter_(1, ids, True)
        self.seen = seen[:, :vocab_size].contiguous()

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        # HF: where(score < 0, score * penalty, score / penalty) on the gathered seen tokens.
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(self.seen, penalised, scores)

    def update(self, tokens: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens[:, None], True)

    def reorder(self, rows: torch.Tensor) -> None:
        self.seen.copy_(self.seen.index_select(0, rows))


class NoRepeatNGram(LogitsProcessor):
    """HF ``no_repeat_ngram_size``: ban every token that would repeat an ``n``-gram of the row.

    The row so far is kept in a preallocated ``(R, L_max)`` history with its length as a device
    scalar; every step compares the last ``n - 1`` tokens with each window of the history (windows
    past the current length are masked), so the shapes never change and nothing goes to the host.
    """

    def __init__(self, ngram_size: int) -> None:
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 1, got {ngram_size!r}")
        self.n = ngram_size
        self.history: torch.Tensor | None = None
        self.length: torch.Tensor | None = None

    def start(
        self, input_ids: torch.Tensor, max_len: int, vocab_size: int, row_start: torch.Tensor | None = None
    ) -> None:
        # HF's n-gram ban sees the pad tokens of a left-padded prompt as tokens: so does this.
        R, T = input_ids.shape
        device = input_ids.device
        self.history = torch.zeros((R, max_len), dtype=torch.long, device=device)
        self.history[:, :T] = input_ids
        self.length = torch.full((1,), T, dtype=torch.long, device=device)
        n, L = self.n, max_len
        # Window j covers history[:, j : j + n]; it exists while j + n <= length.
        self._window_start = torch.arange(max(L - n + 1, 0), device=device)  # (W,)
        # Offsets of the current (n-1)-token suffix relative to `length`: -(n-1) .. -1.
        self._suffix_offsets = torch.arange(-(n - 1), 0, device=device)  # (n-1,)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        R, V = scores.shape
        n = self.n
        if self._window_start.numel() == 0:
            return scores  # the history can never hold a whole n-gram
        windows = self.history.unfold(1, n, 1)  # (R, W, n)
        # The suffix the next token would extend: history[:, length-n+1 : length] (clamped index
        # when length < n - 1; such a step has no complete window anyway, see `exists`).
        suffix_idx = (self.length + self._suffix_offsets).clamp_(min=0)  # (n-1,)
        suffix = self.history.index_select(1, suffix_idx)  # (R, n-1)
        matches = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=-1)  # (R, W)
        # A window must end before the next token: j + n - 1 <= length - 1.
        exists = self._window_start + n <= self.length  # (W,)
        matches &= exists[None, :]
        # Matching windows ban their last token; the others point at a spare column V, so a
        # non-matching window cannot clear a ban set by another one.
        target = torch.where(matches, windows[:, :, -1], V)  # (R, W)
        banned = torch.zeros((R, V + 1), dtype=torch.bool, device=scores.device)
        banned.scatter_(1, target, True)
        return scores.masked_fill(banned[:, :V], float("-inf"))

    def update(self, tokens: torch.Tensor) -> None:
        # history[:, length] = tokens, with the column index on the device.
        self.history.scatter_(1, self.length.expand(tokens.shape[0])[:, None], tokens[:, None])
        self.length += 1

    def reorder(self, rows: torch.Tensor) -> None:
        self.history.copy_(self.history.index_select(0, rows))


class ScoresRecorder(LogitsProcessor):
    """Keeps ``warp(scores).clone()`` of every step in :attr:`scores` (HF's ``output_scores``).

    ``warp`` maps the processed scores to what HF reports (for sampling: temperature, top-k,
    top-p and min-p applied, the filtered tokens at ``-inf``). Appending to a Python list is not
    capturable in a CUDA graph, so this processor is not ``graph_safe``.
    """

    graph_safe = False

    def __init__(self, warp: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.warp = warp
        self.scores: list[torch.Tensor] = []

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        kept = self.warp(scores) if self.warp is not None else scores
        self.scores.append(kept.clone())
        return scores


class ProcessorList(list):
    """An ordered list of processors, applied in HF's order, with the shared hooks fanned out."""

    def __init__(self, processors: Iterable[LogitsProcessor] = (), *, vocab_size: int) -> None:
        super().__init__(processors)
        self.vocab_size = vocab_size

    @property
    def graph_safe(self) -> bool:
        return all(p.graph_safe for p in self)

    def start(self, input_ids: torch.Tensor, max_len: int, row_start: torch.Tensor | None = None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (rows, seq_len), got shape {tuple(input_ids.shape)}")
        for p in self:
            p.start(input_ids, max_len, self.vocab_size, row_start)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        for p in self:
            scores = p(scores)
        return scores

    def update(self, tokens: torch.Tensor) -> None:
        for p in self:
            p.update(tokens)

    def reorder(self, rows: torch.Tensor) -> None:
        for p in self:
            p.reorder(rows)


def build_processors(
    *,
    vocab_size: int,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    record_scores: bool = False,
    warp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProcessorList | None:
    """The processors HF would build for these settings, in HF's order, or None when there are none.

    HF's order: repetition penalty, no-repeat n-gram (HF's min-length ban comes next: the
    :class:`fastgpt.decoder.Decoder` applies it, before these; the result is the same since a
    banned ``-inf`` stays ``-inf``); the scores recorder (``record_scores``) comes last.
    """
    procs: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if record_scores:
        procs.append(ScoresRecorder(warp))
    if not procs:
        return None
    return ProcessorList(procs, vocab_size=vocab_size)


def processors_for(settings, vocab_size: int, input_ids: torch.Tensor, row_start: torch.Tensor | None):
    """The started processors a generation with these :class:`~fastgpt.settings.GenerationSettings`
    needs, for its ``(R, T)`` prompt rows and their ``(R,)`` left-pad counts; None when none.

    Sampling scores are recorded after HF's warpers (temperature, top-k, top-p, min-p), as HF
    reports them; the repetition penalty leaves pad slots out unless ``settings.penalize_pad``.
    """
    warp = None
    if settings.output_scores and not settings.greedy:
        warp = functools.partial(reference.filter_logits, temperature=settings.temperature, top_k=settings.top_k,
                                 top_p=settings.top_p, min_p=settings.min_p)  # fmt: skip
    processors = build_processors(
        vocab_size=vocab_size,
        repetition_penalty=settings.repetition_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        record_scores=settings.output_scores,
        warp=warp,
    )
    if processors is not None:
        processors.start(input_ids, input_ids.shape[1] + settings.max_new_tokens,
                         row_start=None if settings.penalize_pad else row_start)  # fmt: skip
    return processors


def recorded_scores(processors: ProcessorList | None) -> list[torch.Tensor] | None:
    """The scores a :class:`ScoresRecorder` in ``processors`` kept, or None."""
    if processors is None:
        return None
    for p in processors:
        if isinstance(p, ScoresRecorder):
            return p.scores
    return None
