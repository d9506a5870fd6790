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
        with torch.no_grad():
            for name_, p in model.named_parameters():
                if "ln_" in name_ and name_.endswith("weight"):
                    p.uniform_(0.8, 1.2)
                elif name_.endswith("bias"):
                    p.normal_(0.0, 0.02)
                else:
                    p.normal_(0.0, 0.08)
    return model


def pair(name: str = "tiny-503", **kwargs) -> tuple[GPT2LMHeadModel, GPT]:
    hf = hf_gpt2(name, **kwargs)
    return hf, GPT.from_hf(hf)
