"""Small random-weight GPT-2 models shared by the tests (no weights exist offline)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from fastgpt import GPT

hf_logging.set_verbosity_error()

#: (vocab, n_positions, n_embd, n_head, n_layer): odd sizes, and the brief's small 50257-vocab model.
SMALL_CONFIGS = {
    "tiny-503": (503, 64, 48, 3, 2),
    "odd-1001": (1001, 96, 60, 5, 3),
    "v50257-d256": (50257, 128, 256, 8, 4),
}
#: head_dim 64, a size the Triton attention kernels take (the configs above have 16, 12 and 32).
HD64_CONFIGS = {
    "hd64-257": (257, 32, 128, 2, 1),  # small enough for the Triton interpreter
    "hd64-1001": (1001, 96, 128, 2, 2),
    "hd64-50257": (50257, 128, 256, 4, 4),
}


def hf_gpt2(
    name: str = "tiny-503", *, seed: int = 0, eos_token_id: int | None = None, sharp: bool = True, **config_overrides
) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel. ``sharp`` widens the weights so greedy decoding produces varied
    tokens (GPT-2's own 0.02 init gives near-uniform logits and repeats one token);
    ``config_overrides`` are further GPT2Config fields (``n_inner``, ``scale_attn_weights``, ...)."""
    vocab, n_pos, n_embd, n_head, n_layer = {**SMALL_CONFIGS, **HD64_CONFIGS}[name]
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=n_pos,
        n_embd=n_embd,
        n_head=n_head,
        n_layer=n_layer,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    if sharp:
        sharpen(model, norm_marker="ln_", bias_std=0.02)
    return model


@torch.no_grad()
def sharpen(model, *, norm_marker: str, bias_std: float) -> None:
    """Widen a random HF model's weights so that greedy decoding produces varied tokens: norm
    weights (names containing ``norm_marker``) in U(0.8, 1.2), biases N(0, bias_std), the rest
    N(0, 0.08) (the models' own 0.02 init gives near-uniform logits and repeats one token)."""
    for name, p in model.named_parameters():
        if norm_marker in name and name.endswith("weight"):
            p.uniform_(0.8, 1.2)
        elif name.endswith("bias"):
            p.normal_(0.0, bias_std)
        else:
            p.normal_(0.0, 0.08)


def pair(name: str = "tiny-503", **kwargs) -> tuple[GPT2LMHeadModel, GPT]:
    hf = hf_gpt2(name, **kwargs)
    return hf, GPT.from_hf(hf)


#: Small LLaMA-family shapes with the issue's odd sizes: (n_head, n_kv_head, head_dim, hidden, intermediate).
LLAMA_SHAPES = {
    "gqa-9-3": (9, 3, 64, 144, 160),  # 3 query heads per K/V head
    "mqa-4-1": (4, 1, 64, 128, 96),  # multi-query: one K/V head
    "hd128-4-2": (4, 2, 128, 128, 112),  # head_dim 128
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}  # fmt: skip


def hf_llama_family(
    model_type: str = "llama",
    shape: str = "gqa-9-3",
    *,
    vocab: int = 211,
    n_layer: int = 2,
    n_positions: int = 128,
    tied: bool = False,
    rope_scaling: bool = False,
    rope_theta: float = 10000.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    sharp: bool = True,
    **config_overrides,
):
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM``. ``sharp`` widens
    the weights (as :func:`hf_gpt2`) so greedy decoding produces varied tokens; ``rope_scaling``
    switches on Llama 3's rope scaling (:data:`LLAMA3_SCALING`)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    n_head, n_kv_head, head_dim, hidden, intermediate = LLAMA_SHAPES[shape]
    rope = {**LLAMA3_SCALING} if rope_scaling else {"rope_type": "default"}
    rope["rope_theta"] = rope_theta
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, head_dim=head_dim,
        max_position_embeddings=n_positions, tie_word_embeddings=tied, rope_parameters=rope,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
    )  # fmt: skip
    if model_type == "mistral":
        fields["sliding_window"] = None
    config = config_cls(**{**fields, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if sharp:
        sharpen(model, norm_marker="norm", bias_std=0.05)
    return model
