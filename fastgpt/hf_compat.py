"""``fastgpt.accelerate(hf_model)``: a drop-in ``generate()`` for a ``transformers`` GPT-2, Llama,
Qwen2 or Mistral causal LM (:data:`ACCELERATED_CLASSES`).

>>> fast = fastgpt.accelerate(hf_model)           # copies the weights once
>>> out = fast.generate(input_ids, max_new_tokens=50, num_beams=4)   # same arguments, same result type

How a call is served
--------------------
1. The generation settings are resolved exactly as ``hf_model.generate`` resolves them: the
   ``generation_config`` argument (or the model's own ``generation_config``), then HF's global
   defaults (``max_length=20``, ``top_k=50``, ...), then the keyword arguments -- by HF's own
   ``_prepare_generation_config``, so defaults and validation errors are HF's.
2. Every setting, every extra argument and every model keyword is checked against what fastgpt
   implements (:mod:`fastgpt.hf_arguments`: the table ``SUPPORTED`` and the "inactive value"
   rules). Anything else that is active -- a custom ``logits_processor``, ``stopping_criteria``, ``output_attentions``,
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

import inspect
import logging
import warnings

import torch

from .config import unsupported_hf_config
from .generation import run
from .hf_arguments import SUPPORTED, Fallback, as_id_list, fallback_reasons, hf_penalizes_pad_slots
from .settings import GenerationSettings, LengthError, left_padding

__all__ = ["accelerate", "AcceleratedModel", "FallbackWarning", "SUPPORTED", "ACCELERATED_CLASSES"]

#: The transformers model classes :func:`accelerate` wraps (their configs: ``fastgpt.config``).
ACCELERATED_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

logger = logging.getLogger("fastgpt")


class FallbackWarning(UserWarning):
    """A generate() call went to ``hf_model.generate`` because fastgpt does not implement an argument."""


def accelerate(hf_model, strict: bool = False) -> "AcceleratedModel":
    """Wrap a transformers causal LM so that ``.generate`` runs on fastgpt.

    Parameters
    ----------
    hf_model : a ``transformers`` ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM``
        or ``MistralForCausalLM``, on any device and in float32/float16/bfloat16.
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
            import transformers
        except ImportError as exc:  # pragma: no cover - transformers is what we wrap
            raise ImportError("fastgpt.accelerate needs transformers (pip install 'fastgpt[hf]')") from exc
        classes = tuple(getattr(transformers, name) for name in ACCELERATED_CLASSES)
        if not isinstance(hf_model, classes):
            raise TypeError(
                f"fastgpt.accelerate takes a transformers {', '.join(ACCELERATED_CLASSES)}, got {type(hf_model).__name__}"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        # Set through __dict__: __getattr__ forwards unknown names to the HF model.
        self.__dict__.update(hf_model=hf_model, strict=strict, model=None, _weights_key=None, _pad_warned=False)
        if not unsupported_hf_config(hf_model.config):  # otherwise every call falls back (see _plan)
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
        if self.model is None:
            return f"AcceleratedModel(falls back to Hugging Face: {'; '.join(unsupported_hf_config(self.hf_model.config))})"
        c = self.model.config
        return (
            f"AcceleratedModel({c.model_type} n_layer={c.n_layer} n_embd={c.n_embd} vocab={c.vocab_size}, "
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
        except Fallback as fb:
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
        """``(settings, input_ids, row_start)`` for this call, or raise Fallback naming what is not supported."""
        reasons, input_ids, gc, model_kwargs, has_default_max_length = fallback_reasons(self.hf_model, call, dict(kwargs))
        # A model setting fastgpt does not reproduce exactly (e.g. a ReLU MLP) sends every call to HF.
        reasons = unsupported_hf_config(self.hf_model.config) + reasons
        if reasons:
            raise Fallback(reasons)

        # -- special tokens and the mask, as HF's _prepare_special_tokens
        eos = as_id_list(gc.eos_token_id)
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
            raise Fallback([f"attention_mask ({exc})"]) from None

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
            raise Fallback([str(exc)]) from None
        if has_default_max_length and gc.max_new_tokens is None:
            warnings.warn(  # HF's own warning for this case
                f"Using the model-agnostic default `max_length` (={input_ids.shape[1] + settings.max_new_tokens}) "
                "to control the generation length. We recommend setting `max_new_tokens` to control the maximum "
                "length of the generation.",
                UserWarning,
                stacklevel=3,
            )
        return settings, input_ids, row_start

@torch.no_grad()
def _fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """``(n_params,)`` float32 norms of the weights, computed in one multi-tensor pass."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return torch.stack([n.float() for n in norms]).cpu() if norms else torch.zeros(0)  # one host read


# The signature mirrors hf_model.generate's; keep it in sync with the installed transformers.
def _check_signature() -> None:  # pragma: no cover - used by the tests
    from transformers import GenerationMixin

    ours = list(inspect.signature(AcceleratedModel.generate).parameters)[1:]
    theirs = list(inspect.signature(GenerationMixin.generate).parameters)[1:]
    if ours != theirs:
        raise AssertionError(f"AcceleratedModel.generate parameters {ours} differ from transformers' {theirs}")
