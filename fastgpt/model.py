"""The GPT-2 model: embeddings, pre-LN blocks with a fused QKV projection, an LM head.

Module names follow Hugging Face's GPT-2 (``wte``, ``wpe``, ``h.{i}.ln_1``, ``attn.c_attn``,
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``, ``lm_head`` when untied) without
the ``transformer.`` prefix, so loading is a key-for-key copy (see ``fastgpt.loading``). Linear
layers are ``nn.Linear``: HF's Conv1D stores the transpose.

Attention, the projections and the LayerNorms go through ``fastgpt.backend`` (``attention``,
``attention_residual_linear``, ``ln_linear``, ``residual_linear``), the boundary where the Triton
kernels replace the PyTorch reference. The residual stream travels as ``(x, delta)``: ``delta`` is
an update not yet added (the position embedding with the PyTorch backend, or a projection that ran
on cuBLAS), added by the next LayerNorm. With the Triton backend the embedding is one launch
(``wte + wpe``, ``kernels/embedding.py``) and a decode step's layer is 5 launches: LN1 + QKV +
bias, attention (split partials only), out-proj + split combine + bias + residual, LN2 + FC +
bias + GELU, proj + bias + residual (see ``kernels/linear.py``); tests/test_launches.py counts
them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import backend as _backend
from .config import ACTIVATIONS, GPTConfig
from .generation import generate
from .kv_cache import KVCache
from .loading import convert_hf_state_dict, hf_model_weights, read_checkpoint, resolve_dtype


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.layer_index = layer_index
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        # The attention ops scale q . k by 1/sqrt(head_dim); a config with another scale
        # (scale_attn_weights=False, scale_attn_by_inverse_layer_idx) pre-multiplies q by the ratio.
        self.query_factor = config.query_prescale(layer_index)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv``: (B, T, 3C) fused projection -> q, k, v (B, T, H, D), q pre-scaled if the config says so."""
        B, T, C3 = qkv.shape
        # (B, T, 3C) -> 3 x (B, T, H, D): strided views, no copy; the kernels take the strides.
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if self.query_factor != 1.0:
            q = q * self.query_factor  # (B, T, H, D); one extra launch, only for such configs
        return q, k, v

    def attend(self, qkv: torch.Tensor, cache: KVCache, backend: str) -> torch.Tensor:
        """``qkv``: (B, T, 3C) fused projection -> (B, T, C) attention output, before ``c_proj``."""
        B, T, C3 = qkv.shape
        y = _backend.attention(*self.split_heads(qkv), cache, self.layer_index, backend)  # (B, T, H, D)
        return y.reshape(B, T, C3 // 3)  # (B, T, H, D) -> (B, T, C)

    def attend_project(
        self, qkv: torch.Tensor, x: torch.Tensor, cache: KVCache, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x + c_proj(attend(qkv))`` as the stream ``(x, delta)``; in a Triton decode step the
        attention's split combine happens inside the projection's launch (backend docs)."""
        q, k, v = self.split_heads(qkv)
        return _backend.attention_residual_linear(q, k, v, cache, self.layer_index, self.c_proj, x, backend)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        #: The activation's name for the fused kernels (fastgpt.reference.LINEAR_ACTIVATIONS).
        self.activation = ACTIVATIONS[config.activation]


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache, backend: str, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pre-LN block on the residual stream ``x + delta`` (``delta`` pending, or None).

        Returns the stream as ``(x, delta)`` again: the last projection either added its output
        to ``x`` (fused GEMV epilogue, ``delta`` None) or left it pending for the next LayerNorm.
        Numerically this is ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.
        """
        ops, attn, mlp = _backend, self.attn, self.mlp
        qkv, x = ops.ln_linear(x, delta, self.ln_1, attn.c_attn, backend, op="qkv")  # (B, T, 3C)
        x, delta = attn.attend_project(qkv, x, cache, backend)
        f, x = ops.ln_linear(x, delta, self.ln_2, mlp.c_fc, backend, activation=mlp.activation, op="fc")  # (B, T, 4C)
        return ops.residual_linear(f, mlp.c_proj, x, backend, op="mlp_proj")


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
        # Tied (GPT-2): the LM head IS the token-embedding matrix; untied: a weight of its own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)

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
        """From a ``transformers.GPT2LMHeadModel`` instance (weights copied, Conv1D transposed).

        ``dtype`` / ``device`` default to the HF model's. Raises ValueError naming any config
        setting fastgpt cannot run (:func:`fastgpt.config.unsupported_hf_config`).
        """
        config, state = hf_model_weights(hf_model)
        first = next(hf_model.parameters())
        dtype = resolve_dtype(dtype) if dtype is not None else first.dtype
        device = torch.device(device) if device is not None else first.device
        return cls._from_hf_state(config, state, dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | str = torch.float32, device="cpu") -> "GPT":
        """From a local directory or the local Hugging Face cache (safetensors first); never the network.

        Raises FileNotFoundError when there is no such checkpoint, ValueError naming the file when
        one is unreadable or describes a model fastgpt cannot run.
        """
        dtype = resolve_dtype(dtype)
        config, state = read_checkpoint(name_or_path)
        return cls._from_hf_state(config, state, dtype=dtype, device=device)

    @classmethod
    def _from_hf_state(cls, config: GPTConfig, hf_state: dict, *, dtype: torch.dtype, device) -> "GPT":
        """A model of ``config`` holding the HF-named tensors ``hf_state`` (built on the meta device:
        the weights are assigned, never initialised first)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(convert_hf_state_dict(hf_state, model.state_dict(), config), assign=True, strict=True)
        return model.to(device=device, dtype=dtype).eval()

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
        advance_device: bool = True,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``) for ``input_ids`` ``(B, T)``.

        Without a cache, a temporary one of length T is used (one code path for both).
        ``advance_device=False`` advances only the host position ``cache.pos``: the caller
        advances ``cache.pos_tensor`` itself (the decode step does it in the sampler's last
        kernel, saving a launch).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"input_ids has {T} tokens, more than n_positions ({self.config.n_positions})")
            cache = self.new_cache(B, T)
        backend = _backend.resolve_backend(self.device)
        # The residual stream starts as (token embedding, pending position embedding): one
        # embedding launch with the Triton backend (delta None); the PyTorch backend leaves the
        # position embedding pending for the first LayerNorm.
        x, delta = self.embed_parts(input_ids, cache, backend)
        for block in self.h:
            x, delta = block(x, cache, backend, delta)
        cache.advance(T, device=advance_device)
        if last_only:
            x = x[:, -1:]  # (B, 1, C) strided views; the kernels take the row stride
            delta = None if delta is None else delta[:, -1:]
        # ln_f fused into the LM head's GEMV (no bias; the token embedding when tied).
        head = self.wte if self.lm_head is None else self.lm_head
        logits, _ = _backend.ln_linear(x, delta, self.ln_f, head, backend, op="lm_head")
        return logits

    def embed_parts(
        self, input_ids: torch.Tensor, cache: KVCache, backend: str = "torch"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream's start as ``(x, delta)``, each (B, T, C): with the Triton backend
        ``(token + position embeddings, None)`` in one launch (:func:`fastgpt.backend.embed`),
        otherwise ``(token embeddings, position embeddings)``, not yet added."""
        if backend == "triton":
            return _backend.embed(input_ids, self.wte.weight, self.wpe.weight, cache), None
        T = input_ids.shape[1]
        slots = cache.pos_tensor + torch.arange(T, device=input_ids.device, dtype=torch.int32)  # (T,)
        # (B, T): a left-padded row's first real token is position 0; pad slots get position 0 too.
        positions = (slots[None, :] - cache.row_start[:, None]).clamp_(min=0)
        return self.wte(input_ids), self.wpe(positions)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Hugging Face-compatible generation; see :func:`fastgpt.generation.generate`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)
