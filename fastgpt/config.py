"""GPTConfig: the shape of a decoder fastgpt runs -- the GPT-2 family and the LLaMA family (Llama,
Qwen2, Mistral) --, the presets of their real sizes, and the check of which Hugging Face configs
fastgpt can run exactly (:func:`unsupported_hf_config`).

The two families differ in four places, all decided by ``model_type``:

============  =========================  =============================================
              GPT-2 (``"gpt2"``)          LLaMA family (``"llama"/"qwen2"/"mistral"``)
============  =========================  =============================================
positions     learned (``wpe``)          rotary (``rope_theta``, ``rope_scaling``)
norm          LayerNorm (weight + bias)  RMSNorm (weight)
MLP           ``act(c_fc x)``             ``silu(gate x) * (up x)`` (SwiGLU)
K/V heads     ``n_head``                 ``n_kv_head`` (grouped-query attention)
============  =========================  =============================================
"""

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

#: The LLaMA family's Hugging Face ``hidden_act`` names -> the fused kernels' gated activation.
GATED_ACTIVATIONS = {"silu": "silu_glu"}

#: ``model_type`` values fastgpt runs; the last three are the LLaMA family.
MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
LLAMA_FAMILY = ("llama", "qwen2", "mistral")

#: The rotary-embedding ``rope_type`` values fastgpt computes exactly (Hugging Face's names).
ROPE_TYPES = ("default", "llama3")
#: The keys of a ``"llama3"`` rope scaling (Llama 3.1 / 3.2).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a decoder: GPT-2's (the fields of ``transformers.GPT2Config`` that change
    what the model computes), plus the LLaMA family's when ``model_type`` is one of
    :data:`LLAMA_FAMILY`.

    Shared fields, with their Hugging Face names for the LLaMA family: ``vocab_size``,
    ``n_positions`` (``max_position_embeddings``), ``n_embd`` (``hidden_size``), ``n_head``
    (``num_attention_heads``), ``n_layer`` (``num_hidden_layers``), ``layer_norm_epsilon``
    (``rms_norm_eps``), ``activation`` (``hidden_act``), ``tie_word_embeddings`` and ``n_inner``
    (``intermediate_size``).

    GPT-2: ``activation`` is a Hugging Face name from :data:`ACTIVATIONS` (GPT-2: ``"gelu_new"``).
    ``n_inner`` is the MLP width (None: ``4 * n_embd``). The attention scores are
    ``q . k * attention_scale(layer)``: ``1/sqrt(head_dim)`` unless ``scale_attn_weights`` is
    False, divided by ``layer + 1`` when ``scale_attn_by_inverse_layer_idx``.
    ``reorder_and_upcast_attn`` only changes where HF rounds (fastgpt's attention always computes
    its scores in float32), so it is accepted and kept for the round trip to HF. With
    ``tie_word_embeddings`` False the model holds its own ``lm_head`` weight.

    LLaMA family: ``n_kv_head`` K/V heads (None: ``n_head``; must divide it), ``head_size``
    (HF's ``head_dim``; None: ``n_embd // n_head``), rotary positions with base ``rope_theta``
    and ``rope_scaling`` (None, or the ``"llama3"`` parameters as sorted ``(key, value)`` pairs,
    see :meth:`rope_parameters`), biases on the Q/K/V projections (``qkv_bias``), the output
    projection (``out_bias``) and the MLP (``mlp_bias``), and Mistral's ``sliding_window``
    (None: none). A sliding window is exact while the whole context fits in it, so generation
    refuses longer contexts (:attr:`max_context`).
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
    model_type: str = "gpt2"
    n_kv_head: int | None = None
    head_size: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
            _check_positive_int(self, name)
        for name in ("n_inner", "n_kv_head", "head_size", "sliding_window"):
            if getattr(self, name) is not None:
                _check_positive_int(self, name, "None or ")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"GPTConfig.model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        allowed = GATED_ACTIVATIONS if self.is_llama else ACTIVATIONS
        if self.activation not in allowed:
            raise ValueError(
                f"GPTConfig.activation must be one of {', '.join(allowed)} for model_type {self.model_type!r}, "
                f"got {self.activation!r}"
            )
        for name in ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "reorder_and_upcast_attn", "qkv_bias", "out_bias", "mlp_bias"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.is_llama:
            gpt2_only = {"n_kv_head": None, "head_size": None, "rope_scaling": None, "sliding_window": None,
                         "qkv_bias": True, "out_bias": True, "mlp_bias": True}  # fmt: skip
            wrong = [name for name, value in gpt2_only.items() if getattr(self, name) != value]
            if wrong:
                raise ValueError(f"GPTConfig: {', '.join(wrong)} are LLaMA-family settings; model_type 'gpt2' keeps the defaults")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig: the rotary embedding needs an even head_dim, got {self.head_dim}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"GPTConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            keys = tuple(key for key, _ in self.rope_scaling)
            if tuple(sorted(keys)) != tuple(sorted(LLAMA3_ROPE_KEYS)):
                raise ValueError(
                    f"GPTConfig.rope_scaling must be None or the llama3 parameters {LLAMA3_ROPE_KEYS} as (key, value) "
                    f"pairs, got {self.rope_scaling!r}"
                )

    @property
    def is_llama(self) -> bool:
        """True for the LLaMA family (rotary positions, RMSNorm, SwiGLU, grouped K/V heads)."""
        return self.model_type in LLAMA_FAMILY

    @property
    def kv_heads(self) -> int:
        """The number of K/V heads (``n_kv_head``, or ``n_head`` without grouped-query attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def kernel_activation(self) -> str:
        """The MLP activation's name for the fused kernels (``fastgpt.reference.LINEAR_ACTIVATIONS``)."""
        return GATED_ACTIVATIONS[self.activation] if self.is_llama else ACTIVATIONS[self.activation]

    @property
    def max_context(self) -> int:
        """The most tokens (prompt + new) a generation may hold: ``n_positions``, or the sliding
        window when that is smaller (inside it, sliding-window attention is plain causal attention)."""
        if self.sliding_window is None:
            return self.n_positions
        return min(self.n_positions, self.sliding_window)

    def rope_parameters(self) -> dict | None:
        """The llama3 rope scaling as a dict (``{"rope_type": "llama3", "factor": ..., ...}``), or None."""
        if self.rope_scaling is None:
            return None
        return {"rope_type": "llama3", **dict(self.rope_scaling)}

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``n_inner``, or GPT-2's ``4 * n_embd``. (The gated MLP's fused
        gate/up weight has twice as many rows.)"""
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
        """Parameter count, counting a tied embedding once (124M for gpt2, 1.24B for Llama-3.2-1B)."""
        c, f, L, d = self.n_embd, self.mlp_width, self.n_layer, self.head_dim
        q, kv = self.n_head * d, self.kv_heads * d
        if self.is_llama:
            per_block = 2 * c + c * (q + 2 * kv) + q * c + 3 * c * f
            per_block += (q + 2 * kv) * self.qkv_bias + c * self.out_bias + (2 * f + c) * self.mlp_bias
            positions, final_norm = 0, c
        else:
            per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
            positions, final_norm = self.n_positions * c, 2 * c
        head = 0 if self.tie_word_embeddings else self.vocab_size * c
        return self.vocab_size * c + positions + L * per_block + final_norm + head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A :data:`PRESETS` name (``gpt2`` ... ``gpt2-xl``, ``llama-3.2-1b``, ``qwen2.5-0.5b``, ...),
        optionally with overrides (the shapes of the real models, for random-weight runs)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPTConfig":
        """From a transformers config (``GPT2Config``, ``LlamaConfig``, ``Qwen2Config``,
        ``MistralConfig``) or the dict of a checkpoint's ``config.json``.

        Raises
        ------
        ValueError
            naming every setting fastgpt cannot run exactly (see :func:`unsupported_hf_config`),
            or a required field that is missing.
        """
        reasons = unsupported_hf_config(hf_config)
        if reasons:
            raise ValueError("fastgpt cannot run this config: " + "; ".join(reasons))
        get = _getter(hf_config)
        model_type = get("model_type", "gpt2")
        if model_type in LLAMA_FAMILY:
            return _llama_family_from_hf(get, model_type)
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
        """The equivalent transformers config (``GPT2Config``, ``LlamaConfig``, ``Qwen2Config`` or
        ``MistralConfig``), for parity tests and benchmarks."""
        if self.is_llama:
            return _llama_family_to_hf(self)
        from transformers import GPT2Config

        fields = {name: value for name, value in self.to_dict().items() if name in _GPT2_FIELDS}
        fields["activation_function"] = fields.pop("activation")
        return GPT2Config(**fields)

    def to_dict(self) -> dict:
        return asdict(self)


_GPT2_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer", "layer_norm_epsilon", "activation",
                "tie_word_embeddings", "n_inner", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                "reorder_and_upcast_attn")  # fmt: skip


def _check_positive_int(config: GPTConfig, name: str, prefix: str = "") -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be {prefix}an int >= 1, got {value!r}")


def _rope_settings(get) -> tuple[str, float, dict]:
    """``(rope_type, rope_theta, parameters)`` of a LLaMA-family config: transformers 5 keeps them
    in ``rope_parameters``; older ``config.json`` files have ``rope_theta`` and ``rope_scaling``."""
    params = dict(get("rope_parameters") or {})
    legacy = get("rope_scaling")
    if not params and isinstance(legacy, Mapping):
        params = dict(legacy)
    theta = params.get("rope_theta", get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return rope_type, theta, params


def _llama_family_from_hf(get, model_type: str) -> GPTConfig:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if get(name) is None]
    if missing:
        raise ValueError(f"the {model_type} config has no {', '.join(missing)}")
    rope_type, theta, params = _rope_settings(get)
    scaling = None
    if rope_type == "llama3":
        scaling = tuple(sorted((key, params[key]) for key in LLAMA3_ROPE_KEYS))
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    head_size = get("head_dim") or None
    if head_size == hidden // heads and hidden % heads == 0:
        head_size = None
    if model_type == "qwen2":  # Qwen2: biased Q/K/V, unbiased output projection and MLP
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        attention_bias = bool(get("attention_bias", False))
        qkv_bias = out_bias = attention_bias
        mlp_bias = bool(get("mlp_bias", False))
    window = get("sliding_window")
    if model_type == "qwen2" and not get("use_sliding_window", False):
        window = None
    return GPTConfig(
        model_type=model_type,
        vocab_size=get("vocab_size"),
        n_positions=get("max_position_embeddings", 2048),
        n_embd=hidden,
        n_head=heads,
        n_layer=get("num_hidden_layers"),
        n_kv_head=get("num_key_value_heads") or heads,
        head_size=head_size,
        n_inner=get("intermediate_size"),
        layer_norm_epsilon=get("rms_norm_eps", 1e-6),
        activation=get("hidden_act", "silu"),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        sliding_window=window,
    )


def _llama_family_to_hf(config: GPTConfig):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_parameters(), "rope_theta": config.rope_theta}
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.n_positions,
        rms_norm_eps=config.layer_norm_epsilon,
        hidden_act=config.activation,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
    )
    if config.model_type == "llama":
        if config.qkv_bias != config.out_bias:
            raise ValueError("a llama config has one attention_bias for Q/K/V and the output projection")
        fields.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif config.model_type == "qwen2":
        fields.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window)
    else:
        fields.update(sliding_window=config.sliding_window)
    return cls[config.model_type](**fields)


_REQUIRED_HF_FIELDS = ("vocab_size", "n_embd", "n_head", "n_layer")


def _getter(hf_config: Any):
    """``get(name, default=None)`` over a config object or a ``config.json`` dict."""
    if isinstance(hf_config, Mapping):
        return lambda name, default=None: hf_config.get(name, default)
    return lambda name, default=None: getattr(hf_config, name, default)


def unsupported_hf_config(hf_config: Any) -> list[str]:
    """The reasons fastgpt cannot reproduce a Hugging Face config exactly (empty: it can).

    Takes a transformers config or the dict of a ``config.json``. Each reason names the setting
    and its value, e.g. ``"activation_function='relu' (fastgpt runs gelu_new, ...)"``;
    ``accelerate()`` falls back to Hugging Face for these, ``from_hf`` / ``from_pretrained`` raise.
    """
    get = _getter(hf_config)
    reasons = []
    model_type = get("model_type", "gpt2")
    if model_type not in MODEL_TYPES:
        return [f"model_type={model_type!r} (fastgpt runs model_type {', '.join(map(repr, MODEL_TYPES))})"]
    if model_type == "gpt2":
        activation = get("activation_function", "gelu_new")
        if activation not in ACTIVATIONS:
            reasons.append(f"activation_function={activation!r} (fastgpt runs {', '.join(ACTIVATIONS)})")
        return reasons
    activation = get("hidden_act", "silu")
    if activation not in GATED_ACTIVATIONS:
        reasons.append(f"hidden_act={activation!r} (fastgpt runs {', '.join(GATED_ACTIVATIONS)})")
    rope_type, _, params = _rope_settings(get)
    if rope_type not in ROPE_TYPES:
        reasons.append(f"rope_type={rope_type!r} (fastgpt computes {', '.join(ROPE_TYPES)})")
    elif rope_type == "llama3" and any(key not in params for key in LLAMA3_ROPE_KEYS):
        reasons.append(f"rope scaling {params!r} lacks one of {', '.join(LLAMA3_ROPE_KEYS)}")
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        reasons.append(f"partial_rotary_factor={partial!r} (fastgpt rotates the whole head)")
    layer_types = get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and model_type != "mistral" and get(
        "use_sliding_window", False
    ) is False:
        reasons.append(f"layer_types={sorted(set(layer_types))!r} (fastgpt runs full attention layers)")
    return reasons


def _llama(model_type: str = "llama", **fields) -> GPTConfig:
    """A LLaMA-family preset: no biases, untied head, SiLU unless ``fields`` says otherwise."""
    defaults = dict(model_type=model_type, activation="silu", tie_word_embeddings=False, qkv_bias=False,
                    out_bias=False, mlp_bias=False, layer_norm_epsilon=1e-5)  # fmt: skip
    return GPTConfig(**{**defaults, **fields})


_LLAMA3_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192))  # fmt: skip

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_embd=768, n_head=12, n_layer=12),  # 124M
    "gpt2-medium": GPTConfig(n_embd=1024, n_head=16, n_layer=24),  # 355M
    "gpt2-large": GPTConfig(n_embd=1280, n_head=20, n_layer=36),  # 774M
    "gpt2-xl": GPTConfig(n_embd=1600, n_head=25, n_layer=48),  # 1558M
    # The LLaMA family at the shapes of the released checkpoints (random weights in benchmarks).
    "llama-3.2-1b": _llama(vocab_size=128256, n_positions=131072, n_embd=2048, n_head=32, n_kv_head=8, n_layer=16,
                           n_inner=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True),
    "llama-3.2-3b": _llama(vocab_size=128256, n_positions=131072, n_embd=3072, n_head=24, n_kv_head=8, n_layer=28,
                           n_inner=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True),
    "llama-3.1-8b": _llama(vocab_size=128256, n_positions=131072, n_embd=4096, n_head=32, n_kv_head=8, n_layer=32,
                           n_inner=14336, rope_theta=500000.0,
                           rope_scaling=tuple((k, 8.0 if k == "factor" else v) for k, v in _LLAMA3_ROPE)),
    "qwen2.5-0.5b": _llama("qwen2", vocab_size=151936, n_positions=32768, n_embd=896, n_head=14, n_kv_head=2,
                           n_layer=24, n_inner=4864, rope_theta=1000000.0, layer_norm_epsilon=1e-6, qkv_bias=True,
                           tie_word_embeddings=True),
    "qwen2.5-1.5b": _llama("qwen2", vocab_size=151936, n_positions=32768, n_embd=1536, n_head=12, n_kv_head=2,
                           n_layer=28, n_inner=8960, rope_theta=1000000.0, layer_norm_epsilon=1e-6, qkv_bias=True,
                           tie_word_embeddings=True),
    "mistral-7b-v0.1": _llama("mistral", vocab_size=32000, n_positions=32768, n_embd=4096, n_head=32, n_kv_head=8,
                              n_layer=32, n_inner=14336, layer_norm_epsilon=1e-5, sliding_window=4096),
    "smollm2-135m": _llama(vocab_size=49152, n_positions=8192, n_embd=576, n_head=9, n_kv_head=3, n_layer=30,
                           n_inner=1536, rope_theta=100000.0, tie_word_embeddings=True),
}
