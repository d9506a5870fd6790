"""GenerationSettings: every generate() argument checked, and every default resolved, in one place.

Both doors into generation build one frozen :class:`GenerationSettings` here and nowhere else:

* the native ``fastgpt.generate(model, input_ids, max_new_tokens, **kwargs)`` through
  :meth:`GenerationSettings.create`;
* the Hugging Face drop-in (``fastgpt.accelerate``) through
  :meth:`GenerationSettings.from_generation_config`, which resolves a transformers
  ``GenerationConfig`` as ``hf_model.generate`` does (its length rules, its pad default, its
  "unfeasible length" warnings) and then goes through the same checks.

Bad input raises ``TypeError`` / ``ValueError`` naming the argument and the allowed range, before
any kernel runs. The prompt itself (``input_ids``, ``attention_mask``) is checked by
:func:`check_prompt`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["GenerationSettings", "LengthError", "check_prompt", "left_padding", "check_int"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Below this a temperature's reciprocal overflows float32: every scaled score would be +-inf.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


class LengthError(ValueError):
    """A resolved ``max_length`` that does not fit the prompt or the model's position table."""


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _token_ids(value, name: str, vocab_size: int) -> tuple[int, ...] | None:
    """An id, a list of ids or a 1-D tensor of ids as a tuple; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a tensor of {value.dtype}")
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, list, tuple)):
        raise TypeError(f"{name} must be an int or a list of ints, got {type(value).__name__}")
    values = [value] if isinstance(value, int) else list(value)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a list of ints, got an element of type {type(v).__name__}")
        check_int(v, name, 0, vocab_size - 1)
    return tuple(values)


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


def check_prompt(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids (B, T), row_start (B,) int32 or None)`` from a checked prompt and mask.

    A 1-D ``input_ids`` (and mask) is one row. ``row_start`` counts each row's left-pad tokens.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size - 1}], found values in [{lo}, {hi}]")
    return input_ids, left_padding(attention_mask, input_ids)


def _warn_unfeasible(name: str, value: int, prompt_len: int | None, max_length: int, default_max: bool) -> None:
    """transformers' "Unfeasible length constraints" warning, word for word."""
    added = "" if prompt_len is None else f", when added to the prompt length ({prompt_len}),"
    suffix = (
        " Generation will stop at the defined maximum length. You should decrease the minimum length and/or "
        "increase the maximum length."
    )
    if default_max:
        suffix += f" Note that `max_length` is set to {max_length}, its default value."
    warnings.warn(
        f"Unfeasible length constraints: `{name}` ({value}){added} is larger than the maximum possible length "
        f"({max_length})." + suffix,
        UserWarning,
        stacklevel=4,
    )


def _check_sampling(do_sample, temperature, top_k, top_p, min_p, seed) -> bool:
    """Check the sampling arguments; returns whether the call is greedy."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    if not _is_real(temperature) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    greedy = not do_sample or temperature == 0
    if not greedy and not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(
            f"temperature must be finite and >= {MIN_TEMPERATURE:.3g} when sampling (smaller ones overflow "
            f"float32 scores), got {temperature!r}"
        )
    if top_k is not None:
        check_int(top_k, "top_k", 1)
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (not _is_real(min_p) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if seed is not None:
        check_int(seed, "seed", INT64_MIN, INT64_MAX)
    return greedy


def _check_search(
    greedy, repetition_penalty, no_repeat_ngram_size, num_beams, length_penalty, early_stopping,
    num_return_sequences, streamer,
) -> None:  # fmt: skip
    """Check the processors', beam search's and the streamer's arguments."""
    if not _is_real(repetition_penalty) or not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: off), got {repetition_penalty!r}")
    check_int(no_repeat_ngram_size, "no_repeat_ngram_size", 0)
    check_int(num_beams, "num_beams", 1)
    if not _is_real(length_penalty) or math.isnan(length_penalty):
        raise ValueError(f"length_penalty must be a real number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    check_int(num_return_sequences, "num_return_sequences", 1)
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
    _check_streamer(streamer)


@dataclass(frozen=True)
class GenerationSettings:
    """One generate() call's settings, checked and resolved (see the module docstring).

    Sampling fields are resolved: a greedy call has ``temperature=0``, ``top_k=0``, ``top_p=1``,
    ``min_p=0``. ``penalize_pad`` says whether the repetition penalty counts a left-padded
    prompt's pad slots as seen tokens (transformers <= 5.17 does; the native generate does not).
    """

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int = 0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    penalize_pad: bool = False
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    streamer: object = None
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False

    # ---- what the call needs ----------------------------------------------------------------
    @property
    def per_step_host_work(self) -> bool:
        """A streamer, scores or logits need the host (or a copy) after every token."""
        return self.streamer is not None or self.output_scores or self.output_logits

    @property
    def sampling_kwargs(self) -> dict:
        """The per-row sampler settings (``fastgpt.backend.SamplingState`` keywords)."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=self.seed)

    # ---- the native door --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config,
        prompt_len: int,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_token_id=None,
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
        penalize_pad: bool = False,
        warn_min_length: bool = True,
    ) -> "GenerationSettings":
        """Check ``fastgpt.generate``'s keyword arguments against ``config`` (a GPTConfig) and a
        prompt of ``prompt_len`` tokens; see :func:`fastgpt.generate` for their meaning."""
        check_int(max_new_tokens, "max_new_tokens", 1)
        if prompt_len + max_new_tokens > config.max_context:
            raise ValueError(
                f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"exceeds the model's {_context_name(config)}; allowed: max_new_tokens <= "
                f"{config.max_context - prompt_len}"
            )
        check_int(min_new_tokens, "min_new_tokens", 0)
        greedy = _check_sampling(do_sample, temperature, top_k, top_p, min_p, seed)
        _check_search(greedy, repetition_penalty, no_repeat_ngram_size, num_beams, length_penalty, early_stopping,
                      num_return_sequences, streamer)  # fmt: skip
        eos = _token_ids(eos_token_id, "eos_token_id", config.vocab_size)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        else:
            check_int(pad_token_id, "pad_token_id", 0, config.vocab_size - 1)
        for name, value in (("output_scores", output_scores), ("output_logits", output_logits),
                            ("return_dict_in_generate", return_dict_in_generate)):  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if warn_min_length and min_new_tokens > max_new_tokens:
            _warn_unfeasible("min_new_tokens", min_new_tokens, prompt_len, prompt_len + max_new_tokens, False)
        return cls(
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            temperature=0.0 if greedy else float(temperature),
            top_k=0 if greedy or top_k is None else top_k,
            top_p=1.0 if greedy or top_p is None else float(top_p),
            min_p=0.0 if greedy or min_p is None else float(min_p),
            seed=seed,
            eos_token_ids=eos,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
            repetition_penalty=float(repetition_penalty),
            penalize_pad=penalize_pad,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            streamer=streamer,
            # Kept only when they are returned (HF's output object).
            output_scores=output_scores and return_dict_in_generate,
            output_logits=output_logits and return_dict_in_generate,
            return_dict_in_generate=return_dict_in_generate,
        )

    # ---- the Hugging Face door --------------------------------------------------------------
    @classmethod
    def from_generation_config(
        cls,
        gc,
        config,
        prompt_len: int,
        *,
        has_default_max_length: bool,
        streamer=None,
        penalize_pad: bool = False,
    ) -> "GenerationSettings":
        """Resolve a transformers ``GenerationConfig`` (already merged with the call's keywords
        by ``hf_model._prepare_generation_config``) as ``hf_model.generate`` does.

        Lengths follow HF's ``_prepare_generated_length`` (``max_new_tokens`` over
        ``max_length``; the default ``max_length`` capped at ``n_positions``; ``min_new_tokens``
        over ``min_length``), the pad id defaults to the first EOS id, and each sampling warper
        is active only when HF would build it. :class:`LengthError` when the resulting length
        does not fit the prompt or the model (HF raises or runs past its position table).
        """
        n_positions = config.n_positions
        if gc.max_new_tokens is not None:
            max_length = gc.max_new_tokens + prompt_len
        elif has_default_max_length:
            max_length = min(gc.max_length + prompt_len, n_positions)
        else:
            max_length = gc.max_length
        if prompt_len >= max_length or max_length > config.max_context:
            raise LengthError(f"max_length={max_length} with a {prompt_len}-token prompt and {_context_name(config)}")
        # HF's _prepare_generated_length sets min_length from min_new_tokens before it checks both.
        min_length = gc.min_length if gc.min_new_tokens is None else gc.min_new_tokens + prompt_len
        if min_length is not None and min_length > max_length:
            _warn_unfeasible("min_length", min_length, None, max_length, has_default_max_length)
        if gc.min_new_tokens is not None and gc.min_new_tokens + prompt_len > max_length:
            _warn_unfeasible("min_new_tokens", gc.min_new_tokens, prompt_len, max_length, has_default_max_length)
        min_new = gc.min_new_tokens if gc.min_new_tokens is not None else max(0, (gc.min_length or 0) - prompt_len)
        pad = gc.pad_token_id
        if isinstance(pad, torch.Tensor):
            pad = int(pad.reshape(-1)[0])
        sampling: dict = {}
        if gc.do_sample:
            # HF applies each warper only when it is active (temperature != 1, top_k != 0, top_p < 1, min_p set).
            sampling = dict(
                temperature=float(gc.temperature) if gc.temperature is not None else 1.0,
                top_k=gc.top_k if gc.top_k else None,
                top_p=float(gc.top_p) if gc.top_p is not None and gc.top_p < 1.0 else None,
                min_p=float(gc.min_p) if gc.min_p is not None else None,
            )
        return cls.create(
            config,
            prompt_len,
            max_length - prompt_len,
            do_sample=bool(gc.do_sample),
            eos_token_id=gc.eos_token_id if gc.eos_token_id not in (None, []) else None,
            pad_token_id=pad,
            min_new_tokens=min_new,
            repetition_penalty=float(gc.repetition_penalty if gc.repetition_penalty is not None else 1.0),
            no_repeat_ngram_size=gc.no_repeat_ngram_size or 0,
            num_beams=gc.num_beams or 1,
            length_penalty=gc.length_penalty if gc.length_penalty is not None else 1.0,
            early_stopping=gc.early_stopping if gc.early_stopping is not None else False,
            num_return_sequences=gc.num_return_sequences or 1,
            streamer=streamer,
            output_scores=bool(gc.output_scores),
            output_logits=bool(gc.output_logits),
            return_dict_in_generate=bool(gc.return_dict_in_generate),
            penalize_pad=penalize_pad,
            warn_min_length=False,  # HF's own warnings were given above
            **sampling,
        )


def _check_streamer(streamer) -> None:
    """A streamer needs HF's ``put(tensor)`` and ``end()`` methods."""
    if streamer is None:
        return
    for method in ("put", "end"):
        if not callable(getattr(streamer, method, None)):
            raise TypeError(
                f"streamer must have put() and end() methods (transformers' BaseStreamer interface); "
                f"{type(streamer).__name__} has no {method}()"
            )


def _context_name(config) -> str:
    """How an error names the context limit: ``n_positions (1024)``, or the sliding window."""
    if config.max_context < config.n_positions:
        return (
            f"sliding window ({config.sliding_window} tokens: fastgpt computes sliding-window attention exactly only "
            "while the whole context fits in the window)"
        )
    return f"n_positions ({config.n_positions})"
