"""The decoder: GPT-2's pre-LN blocks, and the LLaMA family's (rotary positions, RMSNorm, SwiGLU,
grouped-query attention) on the same fused ops.

Module names follow Hugging Face's GPT-2 (``wte``, ``wpe``, ``h.{i}.ln_1``, ``attn.c_attn``,
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``, ``lm_head`` when untied) without
the ``transformer.`` prefix, so loading GPT-2 is a key-for-key copy (see ``fastgpt.loading``). Linear
layers are ``nn.Linear``: HF's Conv1D stores the transpose. A LLaMA-family model has the same
modules with other contents, so every fused op and the decode step serve both families:

* ``c_attn`` is the fused Q/K/V projection, ``(n_head + 2 n_kv_head) * head_dim`` rows: HF's
  ``q_proj``, ``k_proj``, ``v_proj`` stacked;
* ``ln_1``, ``ln_2``, ``ln_f`` are ``nn.RMSNorm`` (weight only) instead of ``nn.LayerNorm``;
* ``mlp.c_fc`` is the gate and up projections in one weight of ``2 * intermediate_size`` rows,
  interleaved (row ``2j`` gate ``j``, row ``2j + 1`` up ``j``) so that the GEMV's epilogue
  finds each (gate, up) pair in adjacent columns and writes ``silu(gate) * up``
  (``activation="silu_glu"``); ``mlp.c_proj`` is HF's ``down_proj``;
* there is no ``wpe``: the attention kernels rotate q and k (rotary embedding) as they load them.

Attention, the projections and the norms go through ``fastgpt.backend`` (``attention``,
``attention_residual_linear``, ``ln_linear``, ``residual_linear``), the boundary where the Triton
kernels replace the PyTorch reference. The residual stream travels as ``(x, delta)``: ``delta`` is
an update not yet added (the position embedding with the PyTorch backend, or a projection that ran
on cuBLAS), added by the next norm. With the Triton backend the embedding is one launch
(``wte + wpe``, ``kernels/embedding.py``; a gather for the LLaMA family) and a decode step's layer
is 5 launches: norm 1 + QKV (+ bias), attention (rotary + split partials), out-proj + split combine
(+ bias) + residual, norm 2 + FC (+ bias) + GELU or SwiGLU, proj (+ bias) + residual (see
``kernels/linear.py``); tests/test_launches.py counts them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as _backend
from .config import GPTConfig
from .generation import generate
from .kv_cache import KVCache
from .loading import convert_hf_state_dict, hf_model_weights, read_checkpoint, resolve_dtype


def norm_layer(config: GPTConfig) -> nn.Module:
    """The model's norm: ``nn.LayerNorm`` (GPT-2) or ``nn.RMSNorm`` (LLaMA family). Only their
    parameters and ``eps`` are used: ``fastgpt.backend`` runs the fused ops."""
    if config.is_llama:
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.layer_index = layer_index
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.qkv_bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.out_bias)
        # The attention ops scale q . k by 1/sqrt(head_dim); a config with another scale
        # (scale_attn_weights=False, scale_attn_by_inverse_layer_idx) pre-multiplies q by the ratio.
        self.query_factor = config.query_prescale(layer_index)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv``: (B, T, (H + 2 H_kv) D) fused projection -> q (B, T, H, D), k and v (B, T, H_kv, D),
        q pre-scaled if the config says so."""
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        # Strided views, no copy; the kernels take the strides.
        if H_kv == H:  # (B, T, 3HD) -> 3 x (B, T, H, D)
            q, k, v = qkv.unflatten(-1, (3, H, D)).unbind(-3)
        else:  # (B, T, (H + 2 H_kv) D) -> (B, T, H, D), 2 x (B, T, H_kv, D)
            q, k, v = qkv.unflatten(-1, (H + 2 * H_kv, D)).split((H, H_kv, H_kv), dim=-2)
        if self.query_factor != 1.0:
            q = q * self.query_factor  # (B, T, H, D); one extra launch, only for such configs
        return q, k, v

    def attend(self, qkv: torch.Tensor, cache: KVCache, backend: str, rope: torch.Tensor | None = None) -> torch.Tensor:
        """``qkv``: (B, T, (H + 2 H_kv) D) fused projection -> (B, T, H*D) attention output, before ``c_proj``."""
        B, T, _ = qkv.shape
        y = _backend.attention(*self.split_heads(qkv), cache, self.layer_index, backend, rope=rope)  # (B, T, H, D)
        return y.reshape(B, T, self.n_head * self.head_dim)  # (B, T, H, D) -> (B, T, H*D)

    def attend_project(
        self, qkv: torch.Tensor, x: torch.Tensor, cache: KVCache, backend: str, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x + c_proj(attend(qkv))`` as the stream ``(x, delta)``; in a Triton decode step the
        attention's split combine happens inside the projection's launch (backend docs)."""
        q, k, v = self.split_heads(qkv)
        return _backend.attention_residual_linear(
            q, k, v, cache, self.layer_index, self.c_proj, x, backend, rope=rope
        )


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        gated = 2 if config.is_llama else 1  # SwiGLU: gate and up rows interleaved in one weight
        self.c_fc = nn.Linear(config.n_embd, gated * config.mlp_width, bias=config.mlp_bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.mlp_bias)
        #: The activation's name for the fused kernels (fastgpt.reference.LINEAR_ACTIVATIONS).
        self.activation = config.kernel_activation


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        backend: str,
        delta: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pre-norm block on the residual stream ``x + delta`` (``delta`` pending, or None).

        Returns the stream as ``(x, delta)`` again: the last projection either added its output
        to ``x`` (fused GEMV epilogue, ``delta`` None) or left it pending for the next norm.
        Numerically this is ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``. ``rope``: the
        rotary inverse frequencies (LLaMA family) or None.
        """
        ops, attn, mlp = _backend, self.attn, self.mlp
        qkv, x = ops.ln_linear(x, delta, self.ln_1, attn.c_attn, backend, op="qkv")  # (B, T, (H + 2 H_kv) D)
        x, delta = attn.attend_project(qkv, x, cache, backend, rope)
        f, x = ops.ln_linear(x, delta, self.ln_2, mlp.c_fc, backend, activation=mlp.activation, op="fc")  # (B, T, F)
        return ops.residual_linear(f, mlp.c_proj, x, backend, op="mlp_proj")


class GPT(nn.Module):
    """A GPT-2-family or LLaMA-family decoder (``config.model_type``).

    ``model(input_ids)`` returns ``(B, T, vocab)`` logits like a plain PyTorch GPT. With a
    :class:`~fastgpt.kv_cache.KVCache`, ``model(input_ids, cache=cache)`` runs the ``T`` new tokens
    at cache slots ``[cache.pos, cache.pos + T)`` and advances the cache; ``generate()`` uses that.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # Learned positions (GPT-2) or none: the LLaMA family rotates q and k instead.
        self.wpe = None if config.is_llama else nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm_layer(config)
        # Tied (GPT-2): the LM head IS the token-embedding matrix; untied: a weight of its own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        #: The rotary inverse frequencies per device (float32, never cast with the weights).
        self._rope: dict[torch.device, torch.Tensor] = {}

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
        1/sqrt(2 n_layer), norms at 1, biases at 0); ``config`` may be a preset name
        (``fastgpt.config.PRESETS``: GPT-2 and LLaMA-family shapes)."""
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
        """From a ``transformers`` ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
        ``MistralForCausalLM`` instance (weights copied: GPT-2's Conv1D transposed, the LLaMA
        family's Q/K/V and gate/up projections fused).

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
        c = self.config
        if max_len > c.n_positions:
            raise ValueError(f"max_len ({max_len}) exceeds the model's n_positions ({c.n_positions})")
        if max_len > c.max_context:
            raise ValueError(
                f"max_len ({max_len}) exceeds the sliding window ({c.sliding_window}): fastgpt computes sliding-window "
                "attention exactly only while the whole context fits in the window"
            )
        return KVCache(c.n_layer, batch, c.kv_heads, max_len, c.head_dim, self.dtype, self.device)

    def rope_frequencies(self) -> torch.Tensor | None:
        """The ``(head_dim / 2,)`` float32 rotary inverse frequencies on the model's device (LLaMA
        family; None for GPT-2), computed once per device -- before any graph capture, since the
        prefill calls this first."""
        if not self.config.is_llama:
            return None
        device = self.device
        if device not in self._rope:
            from .rope import inverse_frequencies

            self._rope[device] = inverse_frequencies(self.config).to(device)
        return self._rope[device]

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
        rope = self.rope_frequencies()
        for block in self.h:
            x, delta = block(x, cache, backend, delta, rope)
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
        otherwise ``(token embeddings, position embeddings)``, not yet added. The LLaMA family has
        no position embedding: ``(token embeddings, None)``, one gather."""
        if self.wpe is None:
            return F.embedding(input_ids, self.wte.weight), None
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
