"""GPTConfig: the shape of a GPT-2-family model, with the four GPT-2 presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT-2-style decoder.

    ``activation`` is GPT-2's tanh-approximated GELU (``"gelu_new"`` in Hugging Face's naming);
    the LM head always shares the token-embedding matrix when ``tie_word_embeddings`` is true.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not self.tie_word_embeddings:
            raise ValueError("GPTConfig.tie_word_embeddings=False is not supported: GPT-2 ties its LM head")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """Parameter count, counting the tied embedding once (124M for gpt2)."""
        c, L = self.n_embd, self.n_layer
        per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
        return self.vocab_size * c + self.n_positions * c + L * per_block + 2 * c

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config) -> "GPTConfig":
        """From a ``transformers.GPT2Config``."""
        activation = getattr(hf_config, "activation_function", "gelu_new")
        return cls(
            vocab_size=hf_config.vocab_size,
            n_positions=hf_config.n_positions,
            n_embd=hf_config.n_embd,
            n_head=hf_config.n_head,
            n_layer=hf_config.n_layer,
            layer_norm_epsilon=hf_config.layer_norm_epsilon,
            activation=activation,
            tie_word_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        )

    def to_hf(self):
        """The equivalent ``transformers.GPT2Config`` (for parity tests and benchmarks)."""
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_layer=self.n_layer,
            layer_norm_epsilon=self.layer_norm_epsilon,
            activation_function=self.activation,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def to_dict(self) -> dict:
        return asdict(self)


#: GPT-2 activations by Hugging Face name. GPT-2 itself uses "gelu_new" (tanh approximation).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_embd=768, n_head=12, n_layer=12),  # 124M
    "gpt2-medium": GPTConfig(n_embd=1024, n_head=16, n_layer=24),  # 355M
    "gpt2-large": GPTConfig(n_embd=1280, n_head=20, n_layer=36),  # 774M
    "gpt2-xl": GPTConfig(n_embd=1600, n_head=25, n_layer=48),  # 1558M
}
