"""GPTConfig: the shape of a GPT-2-family model, the four GPT-2 presets, and the check of which
Hugging Face GPT-2 configs fastgpt can run exactly (:func:`unsupported_hf_config`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Hugging Face ``activation_function`` names fastgpt runs -> the fused kernels' activation name
#: (``fastgpt.reference.LINEAR_ACTIVATIONS``). The tanh ones are one formula,
#: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; the others are the exact erf GELU.
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",  # GPT-2's own
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT-2-style decoder (the fields of ``transformers.GPT2Config`` that
    change what the model computes).

    ``activation`` is a Hugging Face name from :data:`ACTIVATIONS` (GPT-2: ``"gelu_new"``).
    ``n_inner`` is the MLP width (None: ``4 * n_embd``). The attention scores are
    ``q . k * attention_scale(layer)``: ``1/sqrt(head_dim)`` unless ``scale_attn_weights`` is
    False, divided by ``layer + 1`` when ``scale_attn_by_inverse_layer_idx``.
    ``reorder_and_upcast_attn`` only changes where HF rounds (fastgpt's attention always computes
    its scores in float32), so it is accepted and kept for the round trip to HF. With
    ``tie_word_embeddings`` False the model holds its own ``lm_head`` weight.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    tie_word_embeddings: bool = True
    n_inner: int | None = None
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an int >= 1, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"GPTConfig.n_inner must be None or an int >= 1, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        for name in ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "reorder_and_upcast_attn"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``n_inner``, or GPT-2's ``4 * n_embd``."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def attention_scale(self, layer_index: int) -> float:
        """The factor on ``q . k`` in layer ``layer_index`` (0-based), as Hugging Face computes it."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_index + 1)
        return scale

    def query_prescale(self, layer_index: int) -> float:
        """The factor on q that turns the attention ops' fixed ``1/sqrt(head_dim)`` into
        :meth:`attention_scale`: exactly 1.0 for GPT-2's own scaling (then nothing runs)."""
        factor = 1.0 if self.scale_attn_weights else math.sqrt(self.head_dim)
        if self.scale_attn_by_inverse_layer_idx:
            factor /= float(layer_index + 1)
        return factor

    def num_parameters(self) -> int:
        """Parameter count, counting a tied embedding once (124M for gpt2)."""
        c, f, L = self.n_embd, self.mlp_width, self.n_layer
        per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        head = 0 if self.tie_word_embeddings else self.vocab_size * c
        return self.vocab_size * c + self.n_positions * c + L * per_block + 2 * c + head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPTConfig":
        """From a ``transformers.GPT2Config`` or the dict of a checkpoint's ``config.json``.

        Raises
        ------
        ValueError
            naming every setting fastgpt cannot run exactly (see :func:`unsupported_hf_config`),
            or a required field (``vocab_size``, ``n_embd``, ``n_head``, ``n_layer``) that is missing.
        """
        reasons = unsupported_hf_config(hf_config)
        if reasons:
            raise ValueError("fastgpt cannot run this GPT-2 config: " + "; ".join(reasons))
        get = _getter(hf_config)
        missing = [name for name in _REQUIRED_HF_FIELDS if get(name) is None]
        if missing:
            raise ValueError(f"the GPT-2 config has no {', '.join(missing)}")
        return cls(
            vocab_size=get("vocab_size"),
            n_positions=get("n_positions", 1024),
            n_embd=get("n_embd"),
            n_head=get("n_head"),
            n_layer=get("n_layer"),
            layer_norm_epsilon=get("layer_norm_epsilon", 1e-5),
            activation=get("activation_function", "gelu_new"),
            tie_word_embeddings=get("tie_word_embeddings", True),
            n_inner=get("n_inner", None),
            scale_attn_weights=get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=get("scale_attn_by_inverse_layer_idx", False),
            reorder_and_upcast_attn=get("reorder_and_upcast_attn", False),
        )

    def to_hf(self):
        """The equivalent ``transformers.GPT2Config`` (for parity tests and benchmarks)."""
        from transformers import GPT2Config

        fields = self.to_dict()
        fields["activation_function"] = fields.pop("activation")
        return GPT2Config(**fields)

    def to_dict(self) -> dict:
        return asdict(self)


_REQUIRED_HF_FIELDS = ("vocab_size", "n_embd", "n_head", "n_layer")


def _getter(hf_config: Any):
    """``get(name, default=None)`` over a config object or a ``config.json`` dict."""
    if isinstance(hf_config, Mapping):
        return lambda name, default=None: hf_config.get(name, default)
    return lambda name, default=None: getattr(hf_config, name, default)


def unsupported_hf_config(hf_config: Any) -> list[str]:
    """The reasons fastgpt cannot reproduce a Hugging Face GPT-2 config exactly (empty: it can).

    Takes a ``transformers.GPT2Config`` or the dict of a ``config.json``. Each reason names the
    setting and its value, e.g. ``"activation_function='relu' (fastgpt runs gelu_new, ...)"``;
    ``accelerate()`` falls back to Hugging Face for these, ``from_hf`` / ``from_pretrained`` raise.
    """
    get = _getter(hf_config)
    reasons = []
    model_type = get("model_type", "gpt2")
    if model_type != "gpt2":
        reasons.append(f"model_type={model_type!r} (fastgpt runs GPT-2 models, model_type 'gpt2')")
    activation = get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        reasons.append(f"activation_function={activation!r} (fastgpt runs {', '.join(ACTIVATIONS)})")
    return reasons


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_embd=768, n_head=12, n_layer=12),  # 124M
    "gpt2-medium": GPTConfig(n_embd=1024, n_head=16, n_layer=24),  # 355M
    "gpt2-large": GPTConfig(n_embd=1280, n_head=20, n_layer=36),  # 774M
    "gpt2-xl": GPTConfig(n_embd=1600, n_head=25, n_layer=48),  # 1558M
}
