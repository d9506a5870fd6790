"""The GPT-2 model: embeddings, pre-LN blocks with a fused QKV projection, a tied LM head.

Module names follow Hugging Face's GPT-2 (``wte``, ``wpe``, ``h.{i}.ln_1``, ``attn.c_attn``,
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``) without the ``transformer.``
prefix, so loading is a key-for-key copy (see ``fastgpt.loading``). Linear layers are
``nn.Linear``: HF's Conv1D stores the transpose.

Attention goes through ``fastgpt.backend.attention``, the one boundary where the Triton kernels
replace the PyTorch reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as _backend
from .config import ACTIVATIONS, GPTConfig
from .kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.layer_index = layer_index
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache, backend: str) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        # (B, T, 3C) -> 3 x (B, T, H, D): strided views, no copy; the kernels take the strides.
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        y = _backend.attention(q, k, v, cache, self.layer_index, backend)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache, backend: str) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, backend)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-family decoder.

    ``model(input_ids)`` returns ``(B, T, vocab)`` logits like a plain PyTorch GPT. With a
    :class:`~fastgpt.kv_cache.KVCache`, ``model(input_ids, cache=cache)`` runs the ``T`` new tokens
    at cache slots ``[cache.pos, cache.pos + T)`` and advances the cache; ``generate()`` uses that.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: GPTConfig | str,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        seed: int | None = 0,
    ) -> "GPT":
        """A model with GPT-2's random initialisation (N(0, 0.02), residual projections scaled by
        1/sqrt(2 n_layer)); ``config`` may be a preset name."""
        from .loading import resolve_dtype

        if isinstance(config, str):
            config = GPTConfig.from_preset(config)
        dtype = resolve_dtype(dtype)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config)
        model.init_weights()
        return model.to(dtype=dtype).eval()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, std)

    @classmethod
    def from_hf(cls, hf_model, *, dtype: torch.dtype | str | None = None, device=None) -> "GPT":
        """From a ``transformers.GPT2LMHeadModel`` instance (weights copied, Conv1D transposed)."""
        from .loading import model_from_hf

        return model_from_hf(hf_model, dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | str = torch.float32, device="cpu") -> "GPT":
        """From a local directory or the local Hugging Face cache; never the network."""
        from .loading import load_pretrained

        return load_pretrained(name_or_path, dtype=dtype, device=device)

    # ---- forward -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for ``batch`` rows of up to ``max_len`` tokens, in the model's dtype and device."""
        if max_len > self.config.n_positions:
            raise ValueError(f"max_len ({max_len}) exceeds the model's n_positions ({self.config.n_positions})")
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.head_dim, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``) for ``input_ids`` ``(B, T)``.

        Without a cache, a temporary one of length T is used (one code path for both).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"input_ids has {T} tokens, more than n_positions ({self.config.n_positions})")
            cache = self.new_cache(B, T)
        backend = _backend.resolve_backend(self.device)
        x = self.embed(input_ids, cache)
        for block in self.h:
            x = block(x, cache, backend)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))

    def embed(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Token + position embeddings; positions count from each row's first real token."""
        T = input_ids.shape[1]
        slots = cache.pos_tensor + torch.arange(T, device=input_ids.device, dtype=torch.int32)  # (T,)
        # (B, T): a left-padded row's first real token is position 0; pad slots get position 0 too.
        positions = (slots[None, :] - cache.row_start[:, None]).clamp_(min=0)
        return self.wte(input_ids) + self.wpe(positions)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        # The LM head IS the token-embedding matrix (tied).
        return F.linear(x, self.wte.weight)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Hugging Face-compatible generation; see :func:`fastgpt.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
