"""``fastgpt.accelerate(hf_model)``: a drop-in ``generate()`` for a ``transformers`` GPT-2.

>>> fast = fastgpt.accelerate(hf_model)           # copies the weights once
>>> out = fast.generate(input_ids, max_new_tokens=50, num_beams=4)   # same arguments, same result type

How a call is served
--------------------
1. The generation settings are resolved exactly as ``hf_model.generate`` resolves them: the
   ``generation_config`` argument (or the model's own ``generation_config``), then HF's global
   defaults (``max_length=20``, ``top_k=50``, ...), then the keyword arguments -- by HF's own
   ``_prepare_generation_config``, so defaults and validation errors are HF's.
2. Every setting, every extra argument and every model keyword is checked against what fastgpt
   implements (the table :data:`SUPPORTED` and the "inactive value" rules below). Anything else
   that is active -- a custom ``logits_processor``, ``stopping_criteria``, ``output_attentions``,
   ``num_beam_groups``, ``constraints``, ``assistant_model``, beam sampling, a mask that is not
   left padding, a value HF would reject -- is never ignored: the call goes to
   ``hf_model.generate`` unchanged, with ONE :class:`FallbackWarning` naming the arguments, or
   raises ``ValueError`` when the wrapper was built with ``strict=True``.
3. Otherwise :meth:`fastgpt.settings.GenerationSettings.from_generation_config` resolves the
   lengths (``max_new_tokens`` over ``max_length``; ``min_new_tokens`` over ``min_length``, HF's
   "Unfeasible length constraints" warnings) and the pad default (the first EOS id) as HF does,
   this module infers the attention mask from pad tokens as HF does, and
   :func:`fastgpt.generation.run` generates on the fastgpt copy of the model, returning what HF
   returns: a LongTensor, or ``GenerateDecoderOnlyOutput`` /
   ``GenerateBeamDecoderOnlyOutput`` with ``return_dict_in_generate=True`` (``past_key_values``
   is None: fastgpt's cache is not a ``transformers`` Cache).

Greedy and beam search give HF's tokens. Sampling draws from the same distribution but not the
same tokens (HF uses ``torch.multinomial``; fastgpt a counter-based sampler); its seed comes from
torch's global RNG, so ``torch.manual_seed`` makes it reproducible.

The repetition penalty follows the installed transformers: releases whose ``generate`` passes
``prompt_ignore_length`` leave a left-padded prompt's pad slots unpenalised, older ones (5.17)
penalise them (:func:`hf_penalizes_pad_slots`).

The fastgpt copy is rebuilt when the HF weights change: replaced or moved (``.to()``), changed
in place (version counters), and changed through ``.data`` (which bypasses the version counter:
a per-call fingerprint, the norm of every weight in one fused read, sees it). A change that keeps
every weight's norm (a permutation inside a tensor) is not seen: call :meth:`AcceleratedModel.refresh`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from typing import Any

import torch

from .generation import run
from .settings import GenerationSettings, LengthError, left_padding

__all__ = ["accelerate", "AcceleratedModel", "FallbackWarning", "SUPPORTED"]

logger = logging.getLogger("fastgpt")


class FallbackWarning(UserWarning):
    """A generate() call went to ``hf_model.generate`` because fastgpt does not implement an argument."""


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

# GenerationConfig fields fastgpt implements (read by _to_fastgpt_kwargs).
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


class _Fallback(Exception):
    """Internal: the call must go to HF; ``reasons`` name the arguments."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = reasons


def accelerate(hf_model, strict: bool = False) -> "AcceleratedModel":
    """Wrap a ``transformers.GPT2LMHeadModel`` so that ``.generate`` runs on fastgpt.

    Parameters
    ----------
    hf_model : transformers.GPT2LMHeadModel, on any device and in float32/float16/bfloat16.
    strict : raise ``ValueError`` for an argument fastgpt does not implement instead of falling
        back to ``hf_model.generate`` with a :class:`FallbackWarning`.

    Returns
    -------
    AcceleratedModel, whose ``generate(...)`` takes ``hf_model.generate``'s arguments and returns
    its types; ``.model`` is the fastgpt GPT, ``.hf_model`` the original, other attributes
    (``config``, ``generation_config``, ``device``, ...) are the HF model's.
    """
    return AcceleratedModel(hf_model, strict=strict)


class AcceleratedModel:
    """``hf_model`` with a fastgpt ``generate()``; see :func:`accelerate`."""

    def __init__(self, hf_model, *, strict: bool = False) -> None:
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as exc:  # pragma: no cover - transformers is what we wrap
            raise ImportError("fastgpt.accelerate needs transformers (pip install 'fastgpt[hf]')") from exc
        if not isinstance(hf_model, GPT2LMHeadModel):
            raise TypeError(
                f"fastgpt.accelerate takes a transformers.GPT2LMHeadModel, got {type(hf_model).__name__}"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        # Set through __dict__: __getattr__ forwards unknown names to the HF model.
        self.__dict__.update(hf_model=hf_model, strict=strict, model=None, _weights_key=None, _pad_warned=False)
        self._rebuild()

    # ---- the fastgpt copy ----------------------------------------------------------------
    def _current_weights_key(self) -> tuple:
        params = list(self.hf_model.parameters())
        meta = tuple((name, p.data_ptr(), p._version, p.dtype, p.device) for name, p in self.hf_model.named_parameters())
        return meta, _fingerprint(params)

    def _rebuild(self) -> None:
        from .model import GPT

        model = GPT.from_hf(self.hf_model)  # copies once, Conv1D weights transposed into contiguous rows
        self.__dict__["model"] = model
        self.__dict__["_weights_key"] = self._current_weights_key()

    def refresh(self) -> None:
        """Copy the HF weights again (done automatically when they change)."""
        self._rebuild()

    def _ensure_fresh(self) -> None:
        meta, fingerprint = self._current_weights_key()
        old_meta, old_fingerprint = self._weights_key
        if meta != old_meta or not torch.equal(fingerprint, old_fingerprint):
            logger.info("fastgpt.accelerate: the Hugging Face weights changed; copying them again")
            self._rebuild()

    # ---- attribute forwarding ------------------------------------------------------------
    def __getattr__(self, name: str):
        # Only called for names not found on the wrapper: the HF model's config, device, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["hf_model"], name)

    def __call__(self, *args, **kwargs):
        return self.hf_model(*args, **kwargs)

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"AcceleratedModel(GPT-2 n_layer={c.n_layer} n_embd={c.n_embd} vocab={c.vocab_size}, "
            f"device={self.model.device}, dtype={self.model.dtype}, strict={self.strict})"
        )

    # ---- generate ------------------------------------------------------------------------
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus: bool | None = None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate=None,
        **kwargs,
    ):
        """``hf_model.generate`` with the same arguments and return types, run by fastgpt.

        Arguments fastgpt does not implement send the whole call to ``hf_model.generate`` with one
        :class:`FallbackWarning` naming them (``strict=True``: ``ValueError`` instead).
        """
        call = dict(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            synced_gpus=synced_gpus,
            assistant_model=assistant_model,
            streamer=streamer,
            negative_prompt_ids=negative_prompt_ids,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            custom_generate=custom_generate,
        )
        try:
            settings, input_ids, row_start = self._plan(call, kwargs)
        except _Fallback as fb:
            names = ", ".join(fb.reasons)
            if self.strict:
                raise ValueError(
                    f"fastgpt.accelerate(strict=True): not supported by fastgpt: {names}. "
                    "Build the wrapper with strict=False to fall back to Hugging Face's generate for such calls."
                ) from None
            warnings.warn(
                f"fastgpt does not support {names}; this generate() call runs Hugging Face's generate instead",
                FallbackWarning,
                stacklevel=2,
            )
            return self.hf_model.generate(**{k: v for k, v in call.items() if v is not None}, **kwargs)
        self._ensure_fresh()
        return run(self.model, settings, input_ids, row_start)

    def _plan(self, call: dict, kwargs: dict) -> tuple:
        """``(settings, input_ids, row_start)`` for this call, or raise _Fallback naming what is not supported."""
        hf = self.hf_model
        reasons: list[str] = []
        kwargs = dict(kwargs)

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
            raise _Fallback(reasons)
        input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]

        # -- the settings, resolved by HF itself (model generation_config + defaults + kwargs)
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
        reasons += self._value_checks(gc, input_ids)
        if reasons:
            raise _Fallback(reasons)

        # -- special tokens and the mask, as HF's _prepare_special_tokens
        eos = _as_id_list(gc.eos_token_id)
        pad = gc.pad_token_id
        if isinstance(pad, torch.Tensor):
            pad = int(pad.reshape(-1)[0])
        mask = model_kwargs.get("attention_mask")
        if pad is None and eos and not self._pad_warned:
            logger.warning(
                "fastgpt.accelerate: pad_token_id is not set; using eos_token_id %d for padding, as transformers does",
                eos[0],
            )
            self.__dict__["_pad_warned"] = True
        if mask is None:
            # HF infers the mask from pad tokens when the pad id is set and is not an EOS id.
            if pad is not None and bool((input_ids == pad).any()) and (not eos or pad not in eos):
                mask = (input_ids != pad).long()
        else:
            mask = mask if mask.dim() == 2 else mask[None]
        try:
            row_start = left_padding(mask, input_ids)
        except (TypeError, ValueError) as exc:
            raise _Fallback([f"attention_mask ({exc})"]) from None

        # -- lengths and every other setting, resolved as HF does
        try:
            settings = GenerationSettings.from_generation_config(
                gc,
                self.model.config,
                input_ids.shape[1],
                has_default_max_length=has_default_max_length,
                streamer=call["streamer"],
                penalize_pad=hf_penalizes_pad_slots(),
            )
        except LengthError as exc:
            # HF raises (prompt too long for max_length) or runs past its position table.
            raise _Fallback([str(exc)]) from None
        if has_default_max_length and gc.max_new_tokens is None:
            warnings.warn(  # HF's own warning for this case
                f"Using the model-agnostic default `max_length` (={input_ids.shape[1] + settings.max_new_tokens}) "
                "to control the generation length. We recommend setting `max_new_tokens` to control the maximum "
                "length of the generation.",
                UserWarning,
                stacklevel=3,
            )
        return settings, input_ids, row_start

    def _value_checks(self, gc, input_ids: torch.Tensor) -> list[str]:
        """Values HF would reject or treat differently from fastgpt: these go to HF (which raises or copes)."""
        V = self.hf_model.config.vocab_size
        bad: list[str] = []
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            bad.append(f"input_ids of dtype {input_ids.dtype}")
        elif int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
            bad.append("input_ids outside the vocabulary")
        if gc.do_sample:
            t = gc.temperature
            if t is not None and t != 1.0 and not (isinstance(t, float) and t > 0):
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
            eos = _as_id_list(gc.eos_token_id)
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


@torch.no_grad()
def _fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """``(n_params,)`` float32 norms of the weights, computed in one multi-tensor pass."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return torch.stack([n.float() for n in norms]).cpu() if norms else torch.zeros(0)  # one host read


@functools.cache
def hf_penalizes_pad_slots() -> bool:
    """Whether the installed transformers' repetition penalty counts left-pad slots as seen tokens.

    Releases whose ``generate`` gives ``RepetitionPenaltyLogitsProcessor`` the pad count
    (``prompt_ignore_length``) do not (e.g. 5.24); older ones (5.17) do.
    """
    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length" not in inspect.getsource(GenerationMixin._get_logits_processor)


def _as_id_list(value) -> list[int]:
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


# The signature mirrors hf_model.generate's; keep it in sync with the installed transformers.
def _check_signature() -> None:  # pragma: no cover - used by the tests
    from transformers import GenerationMixin

    ours = list(inspect.signature(AcceleratedModel.generate).parameters)[1:]
    theirs = list(inspect.signature(GenerationMixin.generate).parameters)[1:]
    if ours != theirs:
        raise AssertionError(f"AcceleratedModel.generate parameters {ours} differ from transformers' {theirs}")
