"""Beam search over the preallocated KV cache, with Hugging Face's exact semantics.

Shapes: ``B`` prompts, ``N = num_beams``, ``R = B * N`` cache rows (row ``b * N + i`` is beam ``i``
of prompt ``b``), ``V`` vocabulary, ``T`` prompt length (left padded), ``L = T + max_new_tokens``.

One step, as ``transformers`` 5.x ``_beam_search`` does it (all on device tensors):

1. ``log_probs = log_softmax(logits)`` in float32, then the decoder's EOS ban (min new tokens) and
   the logits processors (repetition penalty, no-repeat n-gram) act on the log-probabilities
   (:meth:`fastgpt.decoder.Decoder.process`); the beam's running score is
   added: ``acc[b, i * V + v] = score[b, i] + log_probs[b * N + i, v]``.
2. The top ``K = max(2, 1 + n_eos) * N`` continuations of ``acc`` per prompt, so at least ``N`` of
   them do not end in EOS. Every top-k here goes through the top-k op (``fastgpt.backend.topk``:
   the CUDA or CPU op of ``fastgpt.kernels.topk``, ties to the lower index as ``torch.topk``).
3. A continuation "hits the stopping criteria" when its token is an EOS id or the sequence reaches
   ``L`` tokens. The best ``N`` that do not become the running beams (finished ones are pushed
   down by ``-1e9``).
4. Among the first ``N`` of the ``K`` (only those), the finished ones are scored
   ``sum_logprob / new_len ** length_penalty`` and merged with the kept hypotheses; the best ``N``
   hypotheses stay. Nothing is added once a prompt's hypotheses are final (``early_stopping=True``
   and ``N`` finished) or the early-stop heuristic says no running beam can beat the worst kept one.
5. The cache rows follow their beams: ``KVCache.reorder_rows`` gathers, in place into the cache's
   preallocated spare buffer, each new beam's source row. No cache is allocated per step.

Generation stops when no prompt can improve (heuristic), when ``early_stopping=True`` and every
prompt has ``N`` finished hypotheses, or at ``L`` tokens. The returned sequences are the best
``num_return_sequences`` hypotheses per prompt, cut to the longest one and filled after their end
with ``pad_token_id`` (or the first EOS id when the pad id is 0, as HF's ``pad or eos`` does).

The stop condition is evaluated on the device every step but read by the host only every
``SYNC_EVERY`` steps: once a stop condition holds, later steps cannot change the kept hypotheses
(their candidates all carry a ``-1e9`` penalty), so the extra steps only cost time and their
recorded scores are dropped.

The arithmetic (the ``-1e9`` penalties, the ``** length_penalty`` on host ints, the top-k calls on
tensors of the same shapes) mirrors HF's operation for operation, because ties between penalised
candidates are broken by the top-k's index order and must fall the same way. That is why
:func:`beam_search` is one long function: it reads step for step against HF's ``_beam_search``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as _backend
from .decoder import Decoder
from .logits_processors import processors_for, recorded_scores

#: Steps between two host reads of the device-side "stop" flag.
SYNC_EVERY = 4

_NEG = -1.0e9  # HF's "impossible" score offset


@dataclass
class BeamSearchOutput:
    """What :func:`beam_search` returns (HF's ``GenerateBeamDecoderOnlyOutput`` fields)."""

    sequences: torch.Tensor  # (B * num_return_sequences, T + n) int64
    sequences_scores: torch.Tensor  # (B * num_return_sequences,) float32, length-penalised
    beam_indices: torch.Tensor  # (B * num_return_sequences, n) int32, -1 past the end
    scores: tuple[torch.Tensor, ...] | None  # per step (R, V) processed log-probs
    logits: tuple[torch.Tensor, ...] | None  # per step (R, V) raw logits
    n_steps: int  # the steps HF runs

    def to_hf(self):
        """transformers' ``GenerateBeamDecoderOnlyOutput`` of these fields."""
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        return GenerateBeamDecoderOnlyOutput(
            sequences=self.sequences,
            sequences_scores=self.sequences_scores if self.scores is not None else None,
            scores=self.scores,
            logits=self.logits,
            beam_indices=self.beam_indices,
        )


def _gather_beams(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j], ...]``: (B, X, ...) gathered with (B, Y) -> (B, Y, ...)."""
    idx = index.reshape(index.shape + (1,) * (t.dim() - 2))
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(model, settings, input_ids: torch.Tensor, row_start: torch.Tensor | None) -> BeamSearchOutput:
    """Beam search with checked :class:`~fastgpt.settings.GenerationSettings` (``num_beams``,
    ``length_penalty``, ``early_stopping``, ``num_return_sequences``, EOS/pad ids, the processors'
    settings, ``output_scores`` / ``output_logits``).

    Parameters
    ----------
    model : fastgpt.GPT
    settings : ``num_beams >= 2`` (1 works too: greedy search with beam bookkeeping).
    input_ids : (B, T) int64 on the model's device, left padded.
    row_start : (B,) int32 count of pad tokens per row, or None.

    ``sequences_scores`` are returned (as by HF) only with ``output_scores``; HF's pad fill is
    ``pad_token_id or eos[0]``.
    """
    device = input_ids.device
    B, T = input_ids.shape
    N = settings.num_beams
    R = B * N
    V = model.config.vocab_size
    max_new_tokens = settings.max_new_tokens
    L = T + max_new_tokens
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping
    eos_token_ids, pad_token_id = settings.eos_token_ids, settings.pad_token_id
    eos = None if not eos_token_ids else torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    n_eos = 0 if eos is None else eos.numel()
    K = max(2, 1 + n_eos) * N
    if K > N * V:
        raise ValueError(f"beam search keeps {K} candidates per prompt but there are only num_beams * vocab = {N * V}")

    # Prompt rows repeated per beam: (B, T) -> (R, T).
    flat_ids = input_ids.repeat_interleave(N, dim=0)
    flat_start = None if row_start is None else row_start.to(device).repeat_interleave(N)  # (R,)
    processors = processors_for(settings, V, flat_ids, flat_start)  # greedy: scores are the log-probs
    decoder = Decoder.create(model, settings, R, L, row_start=flat_start, processors=processors)
    cache = decoder.cache

    # HF: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`.
    fill = (pad_token_id if pad_token_id else int(eos[0])) if eos is not None else -1
    running_seq = torch.full((B, N, L), fill, dtype=torch.long, device=device)
    running_seq[:, :, :T] = flat_ids.view(B, N, T)
    finished_seq = running_seq.clone()
    # Only beam 0 is live at first, so the first step's K candidates are K different tokens.
    running_score = torch.zeros((B, N), dtype=torch.float32, device=device)
    running_score[:, 1:] = _NEG
    finished_score = torch.full((B, N), _NEG, dtype=torch.float32, device=device)
    is_finished = torch.zeros((B, N), dtype=torch.bool, device=device)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    # Per kept sequence, for each new token, the flat cache row it continued (-1: none yet).
    running_src = torch.full((B, N, max_new_tokens), -1, dtype=torch.int32, device=device)
    finished_src = running_src.clone()
    top_n_mask = torch.zeros(K, dtype=torch.bool, device=device)
    top_n_mask[:N] = True
    batch_offset = torch.arange(B, device=device)[:, None] * N  # (B, 1)
    stop_step = torch.full((1,), -1, dtype=torch.int64, device=device)
    all_logits: list[torch.Tensor] = []

    n_steps = 0
    for step in range(max_new_tokens):
        cur_len = T + step
        # The prompt (prefill), then each beam's last token: (B, N) -> (R, 1).
        logits = decoder.logits(flat_ids if step == 0 else running_seq[:, :, cur_len - 1].reshape(R, 1))
        if settings.output_logits:
            all_logits.append(logits.clone())
        log_probs = decoder.process(torch.log_softmax(logits, dim=-1))  # (R, V)

        # 1-2. accumulated scores and the top K continuations per prompt.
        acc = (log_probs.view(B, N, V) + running_score[:, :, None]).reshape(B, N * V)
        top_score, top_index = _backend.topk(acc, K)  # (B, K)
        src_beam = top_index // V  # (B, K) beam within the prompt
        tokens = top_index % V
        cand_seq = _gather_beams(running_seq, src_beam)  # (B, K, L)
        cand_seq[:, :, cur_len] = tokens
        cand_src = _gather_beams(running_src, src_beam)  # (B, K, max_new)
        cand_src[:, :, step] = (src_beam + batch_offset).to(torch.int32)

        # 3. which candidates end here, and the next running beams.
        hits = torch.zeros((B, K), dtype=torch.bool, device=device)
        if eos is not None:
            hits = (tokens[:, :, None] == eos).any(dim=-1)  # (B, K): the token is an EOS id
        if cur_len + 1 >= L:
            hits = torch.ones_like(hits)
        run_score = top_score + hits.to(torch.float32) * _NEG
        keep = _backend.topk(run_score, N)[1]  # (B, N)
        running_seq = _gather_beams(cand_seq, keep)
        running_score = _gather_beams(run_score, keep)
        running_src = _gather_beams(cand_src, keep)

        # 4. merge the newly finished hypotheses (top N candidates only) into the kept ones.
        just_finished = hits & top_n_mask[None, :]
        fin = top_score / ((cur_len + 1 - T) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        fin += full.to(torch.float32) * _NEG
        fin += (~can_improve).to(torch.float32) * _NEG
        fin += (~just_finished) * _NEG
        merged_score = torch.cat((finished_score, fin), dim=1)  # (B, N + K)
        best = _backend.topk(merged_score, N)[1]
        finished_seq = _gather_beams(torch.cat((finished_seq, cand_seq), dim=1), best)
        finished_score = _gather_beams(merged_score, best)
        finished_src = _gather_beams(torch.cat((finished_src, cand_src), dim=1), best)
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), dim=1), best)

        # 5. the cache rows and the processors' per-row state follow their beams.
        rows = running_src[:, :, step].reshape(R).long()
        cache.reorder_rows(rows)
        if processors is not None:
            processors.reorder(rows)
        decoder.record(running_seq[:, :, cur_len].reshape(R))
        n_steps = step + 1

        # Stop condition (HF `_check_early_stop_heuristic` + `_beam_search_has_unfinished_sequences`).
        new_len = cur_len + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = L - T
        else:
            best_len = new_len - T
        best_running = running_score[:, :1] / (best_len**length_penalty)
        worst_kept = torch.where(is_finished, torch.min(finished_score, dim=1, keepdim=True)[0], _NEG)
        can_improve = can_improve & torch.any(best_running > worst_kept, dim=-1, keepdim=True)
        if new_len >= L:
            break  # every candidate hit max_length: HF stops here
        go_on = torch.any(can_improve) & ~(torch.all(is_finished) & (early_stopping is True))
        stop_step.masked_fill_((stop_step < 0) & ~go_on, step)
        if n_steps % SYNC_EVERY == 0 and bool(stop_step >= 0):
            break  # the host read: every SYNC_EVERY steps

    stopped = int(stop_step)
    if stopped >= 0:
        n_steps = stopped + 1  # the steps HF runs; the later ones changed nothing that is kept
    num_return_sequences = settings.num_return_sequences
    sequences = finished_seq[:, :num_return_sequences].reshape(B * num_return_sequences, L)
    seq_scores = finished_score[:, :num_return_sequences].reshape(-1)
    src = finished_src[:, :num_return_sequences].reshape(B * num_return_sequences, max_new_tokens)
    n_out = int((src >= 0).sum(dim=1).max())
    rec = recorded_scores(processors)
    scores = tuple(rec[:n_steps]) if rec is not None else None
    return BeamSearchOutput(
        sequences=sequences[:, : T + n_out],
        sequences_scores=seq_scores,
        beam_indices=src[:, :n_out],
        scores=scores,
        logits=tuple(all_logits[:n_steps]) if settings.output_logits else None,
        n_steps=n_steps,
    )
