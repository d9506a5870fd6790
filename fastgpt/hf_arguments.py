"""Which ``hf_model.generate`` arguments fastgpt runs, and the decision to fall back to HF.

:func:`fallback_reasons` reads one call (generate()'s own arguments, the prompt, the
``GenerationConfig`` resolved by HF's own ``_prepare_generation_config``) and names everything
fastgpt does not implement or that HF would reject: the table :data:`SUPPORTED` (the README's),
the fields with no effect, and the "inactive value" rule of every other field. An empty list
means fastgpt serves the call (``fastgpt.hf_compat`` then resolves it into
:class:`~fastgpt.settings.GenerationSettings`).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch

from .settings import MIN_TEMPERATURE

__all__ = ["SUPPORTED", "Fallback", "fallback_reasons", "value_reasons", "as_id_list", "hf_penalizes_pad_slots"]

#: The generate() arguments fastgpt runs itself (the README's table).
SUPPORTED: dict[str, str] = {
    "inputs / input_ids": "(B, T) token ids; a 1-D tensor is one row",
    "attention_mask": "left padding (0s then 1s); inferred from pad tokens as HF does when omitted",
    "generation_config": "a GenerationConfig used as the base, as HF",
    "max_new_tokens / max_length": "HF's precedence; default max_length=20 (capped at n_positions)",
    "min_new_tokens / min_length": "EOS forbidden before the minimum, as HF",
    "do_sample": "greedy (False) or sampling (True)",
    "temperature, top_k, top_p, min_p": "sampling filters, HF's order and defaults (top_k=50)",
    "num_beams": "beam search (do_sample=False)",
    "length_penalty, early_stopping": "beam search scoring and stopping (True/False/'never')",
    "num_return_sequences": "beam search (<= num_beams) and sampling",
    "repetition_penalty": "greedy, sampling and beam search",
    "no_repeat_ngram_size": "greedy, sampling and beam search",
    "eos_token_id": "an int or a list",
    "pad_token_id": "defaults to the first EOS id, as HF",
    "bos_token_id": "accepted (only used by HF when there is no prompt)",
    "streamer": "HF's put()/end() interface (TextStreamer works); not with beam search, as HF",
    "return_dict_in_generate, output_scores, output_logits": "HF's output classes and per-step tensors",
    "use_cache, cache_implementation, compile_config, disable_compile, prefill_chunk_size": "accepted, no effect",
}

# GenerationConfig fields fastgpt implements (resolved by GenerationSettings.from_generation_config).
_HANDLED = {
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "early_stopping",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}

# Fields that do not change what HF generates (performance knobs, metadata, settings only read
# by a mode that is itself flagged, e.g. the assistant's).
_NO_EFFECT = {
    "use_cache",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "prefill_chunk_size",
    "transformers_version",
    "_from_model_config",
    "_commit_hash",
    "_original_object_hash",
    "decoder_start_token_id",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "assistant_ensemble_weight",
    "speculation_type",
    "max_matching_ngram_size",
    "diversity_penalty",  # only read by group beam search (num_beam_groups > 1, flagged)
}


def _none(v, gc) -> bool:
    return v is None


def _falsy(v, gc) -> bool:
    return not v


def _sampling_only(active):
    """Inactive unless sampling and ``active(v)``."""
    return lambda v, gc: not gc.do_sample or v is None or not active(v)


# Unsupported fields: name -> "this value (in this config) is inactive", i.e. HF ignores it.
_INACTIVE: dict[str, Any] = {
    "max_time": _none,
    "stop_strings": _none,
    "use_mtp": _falsy,
    "typical_p": _sampling_only(lambda v: v < 1.0),
    "epsilon_cutoff": _sampling_only(lambda v: 0.0 < v < 1.0),
    "eta_cutoff": _sampling_only(lambda v: 0.0 < v < 1.0),
    "top_h": _sampling_only(lambda v: True),
    "encoder_repetition_penalty": lambda v, gc: v is None or v == 1.0,
    "encoder_no_repeat_ngram_size": lambda v, gc: v is None or v <= 0,
    "bad_words_ids": _none,
    "renormalize_logits": lambda v, gc: v is not True,
    "forced_bos_token_id": _none,
    "forced_eos_token_id": _none,
    "remove_invalid_values": lambda v, gc: v is not True,
    "exponential_decay_length_penalty": _none,
    "suppress_tokens": _none,
    "begin_suppress_tokens": _none,
    "sequence_bias": _none,
    "token_healing": _falsy,
    "guidance_scale": lambda v, gc: v is None or v == 1,
    "watermarking_config": _none,
    "output_attentions": _falsy,
    "output_hidden_states": _falsy,
    "is_assistant": _falsy,
    "prompt_lookup_num_tokens": _none,
    "assistant_early_exit": _none,
    "continuous_batching_config": _none,
    "low_memory": _falsy,
    "penalty_alpha": lambda v, gc: v is None or v <= 0,
    "dola_layers": _none,
    "num_beam_groups": lambda v, gc: v is None or v == 1,
    "constraints": _none,
    "force_words_ids": _none,
    "cache_implementation": lambda v, gc: v != "paged",  # "paged" switches HF to continuous batching
}


class Fallback(Exception):
    """The call must go to HF; ``reasons`` name the arguments."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = reasons


def fallback_reasons(hf, call: dict, kwargs: dict):
    """``(reasons, input_ids (B, T), gc, model_kwargs, has_default_max_length)`` for one call.

    ``call`` holds generate()'s named arguments, ``kwargs`` the rest (consumed). Raises
    :class:`Fallback` at once when the call's own arguments or its prompt are not ones fastgpt
    takes; otherwise ``reasons`` lists the settings fastgpt does not run (empty: it runs them).
    """
    input_ids = _call_and_prompt(hf, call, kwargs)
    return _settings_reasons(hf, call, kwargs, input_ids)


def _call_and_prompt(hf, call: dict, kwargs: dict) -> torch.Tensor:
    """The ``(B, T)`` prompt; :class:`Fallback` for generate() arguments fastgpt does not run."""
    reasons: list[str] = []
    # -- generate()'s own arguments
    for name in ("logits_processor", "stopping_criteria"):
        value = call[name]
        if value is not None and len(value) > 0:
            reasons.append(name)
    for name in (
        "prefix_allowed_tokens_fn",
        "assistant_model",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "custom_generate",
    ):
        if call[name] is not None:
            reasons.append(name)
    if call["synced_gpus"]:
        reasons.append("synced_gpus")
    kwargs.pop("tokenizer", None)  # HF reads it only for stop_strings / token_healing (checked below)
    kwargs.pop("trust_remote_code", None)  # only meaningful with custom_generate (checked above)
    if kwargs.pop("assistant_tokenizer", None) is not None:
        reasons.append("assistant_tokenizer")
    if hf.training:
        reasons.append("hf_model in training mode (dropout is active)")

    # -- the prompt
    inputs = call["inputs"]
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        reasons.append("inputs together with input_ids")
    input_ids = inputs if inputs is not None else input_ids
    if kwargs.get("inputs_embeds") is not None:
        reasons.append("inputs_embeds")
    if input_ids is None:
        reasons.append("no input_ids (a generation from bos_token_id)")
    elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        reasons.append("input_ids that are not a non-empty 1-D or 2-D tensor")
    if reasons:
        raise Fallback(reasons)
    return input_ids if input_ids.dim() == 2 else input_ids[None]


def _settings_reasons(hf, call: dict, kwargs: dict, input_ids: torch.Tensor):
    """The settings part of :func:`fallback_reasons`: the call's ``GenerationConfig``, resolved by
    HF itself (the model's ``generation_config``, HF's defaults, the keywords), field by field."""
    reasons: list[str] = []
    gc_arg = call["generation_config"]
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (gc_arg is None or gc_arg.max_length is None)
        and hf.generation_config.max_length is None
    )
    gc, model_kwargs = hf._prepare_generation_config(gc_arg, **kwargs)
    for key, value in model_kwargs.items():
        if key in ("attention_mask", "output_attentions", "output_hidden_states"):
            continue  # the mask is handled below; the output_* flags come from gc
        if value is not None:
            reasons.append(key)
    fields = {k: v for k, v in vars(gc).items() if not k.startswith("_")}
    from transformers import GenerationConfig

    global_defaults = GenerationConfig._get_default_generation_params()
    model_fields = hf.generation_config.to_dict()
    for name, value in fields.items():
        if name in _HANDLED or name in _NO_EFFECT:
            continue
        rule = _INACTIVE.get(name)
        if rule is not None:
            if not rule(value, gc):
                reasons.append(f"{name}={value!r}")
        elif value is not None and value != global_defaults.get(name) and name not in model_fields:
            # A field this fastgpt does not know (a newer transformers): not ignored silently.
            reasons.append(f"{name}={value!r}")
    if gc.num_beams is not None and gc.num_beams > 1 and gc.do_sample:
        reasons.append("do_sample=True with num_beams > 1 (beam sampling)")
    reasons += value_reasons(gc, input_ids, hf.config.vocab_size)
    return reasons, input_ids, gc, model_kwargs, has_default_max_length



def value_reasons(gc, input_ids: torch.Tensor, vocab_size: int) -> list[str]:
    """Values HF would reject or treat differently from fastgpt: these go to HF (which raises or copes)."""
    V = vocab_size
    bad: list[str] = []
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        bad.append(f"input_ids of dtype {input_ids.dtype}")
    elif int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        bad.append("input_ids outside the vocabulary")
    if gc.do_sample:
        t = gc.temperature
        # Non-finite or vanishing temperatures: HF decides (it raises, or samples as it does).
        if t is not None and t != 1.0 and not (isinstance(t, float) and MIN_TEMPERATURE <= t < math.inf):
            bad.append(f"temperature={t!r}")
        k = gc.top_k
        if k is not None and k != 0 and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
            bad.append(f"top_k={k!r}")
        p = gc.top_p
        if p is not None and p < 1.0 and not (isinstance(p, (int, float)) and 0 < p):
            bad.append(f"top_p={p!r}")
        m = gc.min_p
        if m is not None and not (isinstance(m, (int, float)) and 0 <= m <= 1):
            bad.append(f"min_p={m!r}")
    r = gc.repetition_penalty
    if r is not None and r != 1.0 and not (isinstance(r, float) and r > 0 and r != float("inf")):
        bad.append(f"repetition_penalty={r!r}")
    n = gc.no_repeat_ngram_size
    if n is not None and n > 0 and not (isinstance(n, int) and not isinstance(n, bool)):
        bad.append(f"no_repeat_ngram_size={n!r}")
    lengths = ("max_new_tokens", "min_new_tokens", "min_length", "max_length", "num_return_sequences", "num_beams")
    for name in lengths:
        value = getattr(gc, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            bad.append(f"{name}={value!r}")
    lp = gc.length_penalty
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, (int, float))):
        bad.append(f"length_penalty={lp!r}")
    try:
        eos = as_id_list(gc.eos_token_id)
    except (TypeError, ValueError):
        bad.append(f"eos_token_id={gc.eos_token_id!r}")
    else:
        if any(e < 0 or e >= V for e in eos):
            bad.append(f"eos_token_id={gc.eos_token_id!r} (outside the vocabulary)")
    pad = gc.pad_token_id
    if isinstance(pad, torch.Tensor) and pad.numel() == 1:
        pad = int(pad.reshape(-1)[0])
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < V):
        bad.append(f"pad_token_id={gc.pad_token_id!r}")
    for name in ("output_scores", "output_logits", "return_dict_in_generate", "do_sample"):
        value = getattr(gc, name)
        if value is not None and not isinstance(value, bool):
            bad.append(f"{name}={value!r}")
    return bad


@functools.cache
def hf_penalizes_pad_slots() -> bool:
    """Whether the installed transformers' repetition penalty counts left-pad slots as seen tokens.

    Releases whose ``generate`` gives ``RepetitionPenaltyLogitsProcessor`` the pad count
    (``prompt_ignore_length``) do not (e.g. 5.24); older ones (5.17) do.
    """
    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length" not in inspect.getsource(GenerationMixin._get_logits_processor)


def as_id_list(value) -> list[int]:
    """HF's eos forms (int, list of ints, tensor) as a list of ints; [] for None."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, bool):
        raise TypeError("eos_token_id must be an int or a list of ints")
    if isinstance(value, int):
        return [value]
    ids = list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        raise TypeError("eos_token_id must be an int or a list of ints")
    return ids
