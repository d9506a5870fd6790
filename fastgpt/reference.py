"""PyTorch reference ops: the CPU path of the model and the oracle of every kernel test.

Each function here states the exact semantics a kernel in ``kernels/`` must reproduce:

* :func:`attention` -- causal attention over the preallocated KV cache, writing the new K/V
  into the cache first (prefill when ``start == 0`` and ``T > 1``, decode when ``T == 1``).
* :func:`filter_logits` / :func:`sampling_probs` -- temperature, top-k, top-p (nucleus) and
  min-p, in Hugging Face's order (temperature -> top-k -> top-p -> min-p).
* :func:`greedy`, :func:`sample` -- the next-token choice (argmax, or an exponential-race draw
  that needs no host sync).
* :func:`topk` -- values sorted descending, ties broken by the lower index, NaN ranked above +inf.
* :func:`apply_rope`, :func:`add_rmsnorm`, :func:`activate` (``"silu_glu"``) -- the LLaMA family's
  rotary embedding, RMSNorm and SwiGLU, as the fused kernels must compute them.

Layout conventions shared with the kernels
------------------------------------------
* ``q``: ``(B, T, H, D)``, ``k, v``: ``(B, T, H_kv, D)`` (``H_kv`` divides ``H``: grouped-query
  attention; GPT-2 has ``H_kv == H``), any strides as long as the last dimension is contiguous
  (they are views into the fused QKV projection's output).
* ``k_cache, v_cache``: ``(B, H_kv, S_max, D)`` contiguous, one pair per layer.
* Cache slot ``j`` of row ``b`` is valid when ``row_start[b] <= j``: rows are left padded,
  ``row_start[b]`` is the number of pad tokens in front of row ``b``'s prompt.
* The query at slot ``i`` attends to slots ``j`` with ``row_start[b] <= j <= i``. A pad query
  (``i < row_start[b]``) attends to nothing and its output is defined as zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_at",
    "apply_rope",
    "rope_positions",
    "repeat_kv",
    "filter_logits",
    "sampling_probs",
    "greedy",
    "sample",
    "sampling_status",
    "record_sampling_status",
    "STATUS_NAN",
    "STATUS_POS_INF",
    "STATUS_NO_TOKEN",
    "topk",
    "as_row_tensor",
]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    row_start: torch.Tensor | None = None,
    *,
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``k, v`` into the cache at slots ``[start, start + T)`` and attend causally.

    Parameters
    ----------
    q : (B, T, H, D); k, v : (B, T, H_kv, D) with ``H % H_kv == 0`` (grouped-query attention:
        query head ``h`` reads K/V head ``h // (H // H_kv)``; ``H_kv == H`` is GPT-2's case).
    k_cache, v_cache : (B, H_kv, S_max, D), updated in place.
    start : the cache slot of the first of the ``T`` new tokens (a host int).
    row_start : (B,) int, first valid slot of each row (left padding), or None for no padding.
    rope : None, or the ``(D/2,)`` float32 rotary inverse frequencies: q and k are rotated
        (:func:`apply_rope`) at positions ``slot - row_start`` (:func:`rope_positions`) before
        ``k`` is written into the cache.

    Returns
    -------
    (B, T, H, D) attention output in q's dtype; zeros for pad queries.
    """
    B, T, H, D = q.shape
    end = start + T
    _check_gqa(q, k, v, k_cache)
    if rope is not None:
        slots = torch.arange(start, end, device=q.device)
        positions = rope_positions(slots, row_start, B)  # (B, T)
        q, k = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
    # (B, T, H_kv, D) -> (B, H_kv, T, D): the cache layout.
    k_cache[:, :, start:end] = k.transpose(1, 2)
    v_cache[:, :, start:end] = v.transpose(1, 2)
    keys = repeat_kv(k_cache[:, :, :end], H)  # (B, H, end, D)
    values = repeat_kv(v_cache[:, :, :end], H)
    queries = q.transpose(1, 2)  # (B, H, T, D)
    scale = 1.0 / math.sqrt(D)

    if row_start is None:
        if T == 1:
            out = F.scaled_dot_product_attention(queries, keys, values, scale=scale)
        elif start == 0:
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale)
        else:
            mask = _causal_mask(start, T, end, q.device)[None, None]
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)

    q_slot = torch.arange(start, end, device=q.device)  # (T,)
    k_slot = torch.arange(end, device=q.device)  # (end,)
    row_start = row_start.to(device=q.device, dtype=torch.long)
    allowed = (k_slot[None, None, :] <= q_slot[None, :, None]) & (
        k_slot[None, None, :] >= row_start[:, None, None]
    )  # (B, T, end)
    is_pad_query = q_slot[None, :] < row_start[:, None]  # (B, T)
    # A pad query has no valid key; let it see slot 0 so softmax stays finite, then zero it.
    allowed = allowed | (is_pad_query[:, :, None] & (k_slot == 0)[None, None, :])
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None], scale=scale)
    out = out.masked_fill(is_pad_query[:, None, :, None], 0.0)
    return out.transpose(1, 2)


def attention_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_pos: torch.Tensor,
    row_start: torch.Tensor,
    *,
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`attention` with the start slot as a ``(1,)`` device tensor instead of a host int.

    Attends over the whole cache with a mask built on the device, so it is CUDA-graph safe
    (nothing depends on a host value) at the cost of reading all ``S_max`` slots: the fallback of
    the Triton backend for head sizes its kernels do not cover.
    """
    B, T, H, D = q.shape
    S = k_cache.shape[2]
    _check_gqa(q, k, v, k_cache)
    slots = cache_pos.to(torch.long) + torch.arange(T, device=q.device)  # (T,)
    if rope is not None:
        positions = rope_positions(slots, row_start, B)  # (B, T)
        q, k = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
    k_cache.index_copy_(2, slots, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.transpose(1, 2).to(v_cache.dtype))
    k_slot = torch.arange(S, device=q.device)
    row_start = row_start.to(torch.long)
    allowed = (k_slot[None, None, :] <= slots[None, :, None]) & (k_slot[None, None, :] >= row_start[:, None, None])
    is_pad_query = slots[None, :] < row_start[:, None]  # (B, T)
    allowed = allowed | (is_pad_query[:, :, None] & (k_slot == 0)[None, None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), repeat_kv(k_cache, H), repeat_kv(v_cache, H), attn_mask=allowed[:, None],
        scale=1.0 / math.sqrt(D),
    )
    out = out.masked_fill(is_pad_query[:, None, :, None], 0.0)
    return out.transpose(1, 2)


def _check_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> None:
    H, H_kv = q.shape[2], k.shape[2]
    if v.shape[2] != H_kv or k_cache.shape[1] != H_kv or H % H_kv:
        raise ValueError(
            f"q has {H} heads, k {H_kv}, v {v.shape[2]}, the cache {k_cache.shape[1]}: k, v and the cache "
            "must have the same number of K/V heads, and it must divide q's"
        )


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, H_kv, S, D) -> (B, n_head, S, D)``: each K/V head repeated for its ``n_head / H_kv``
    query heads, in order (query head ``h`` gets K/V head ``h // group``, as Hugging Face's
    ``repeat_kv``). A view-free no-op when ``H_kv == n_head``."""
    group = n_head // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def rope_positions(slots: torch.Tensor, row_start: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``(B, T)`` int64 rotary positions of cache ``slots`` ``(T,)``: ``slot - row_start[b]``,
    so a left-padded row's first real token is position 0 (Hugging Face's ``position_ids`` from
    the attention mask); pad slots get position 0 too (they are never attended to)."""
    slots = slots.to(torch.long)[None, :].expand(batch, -1)
    if row_start is None:
        return slots
    return (slots - row_start.to(device=slots.device, dtype=torch.long)[:, None]).clamp(min=0)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(B, T, H, D)`` at ``positions`` ``(B, T)``, in x's dtype.

    Hugging Face's Llama convention (rotate-half, not interleaved pairs): with ``f = pos *
    inv_freq`` in float32 (``(B, T, D/2)``), ``cos = cos([f, f])`` and ``sin = sin([f, f])``
    rounded to x's dtype, ``out = x * cos + rotate_half(x) * sin`` where ``rotate_half([a, b]) =
    [-b, a]`` over the two halves of the head dimension. Kernels compute the same in float32 and
    round once.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


def _causal_mask(start: int, T: int, end: int, device: torch.device) -> torch.Tensor:
    q_slot = torch.arange(start, start + T, device=device)
    k_slot = torch.arange(end, device=device)
    return k_slot[None, :] <= q_slot[:, None]  # (T, end)


# --------------------------------------------------------------------------------------------
# Next-token selection
# --------------------------------------------------------------------------------------------
def as_row_tensor(value, batch: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A scalar or a per-row tensor of one sampling setting as a ``(batch,)`` tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] not in (1, batch):
            raise ValueError(f"{name} must be a scalar or a ({batch},) tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).expand(batch)
    return torch.full((batch,), value, dtype=dtype, device=device)


def filter_logits(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
) -> torch.Tensor:
    """Temperature-scaled logits in float32 with every token outside the kept set at ``-inf``.

    Hugging Face's order: divide by the temperature, keep the ``top_k`` largest (``0`` keeps all;
    ties at the k-th value are all kept, as HF does), keep the smallest prefix of the
    descending-sorted distribution whose mass reaches ``top_p`` (a token is kept when the mass
    strictly before it is below ``top_p``; the most likely token is always kept), then keep tokens
    with probability ``>= min_p * p_max``. Each setting is a scalar or a per-row ``(B,)`` tensor.
    A row with temperature 0 is greedy: only its argmax survives.
    """
    B, V = logits.shape
    dev = logits.device
    temperature = as_row_tensor(temperature, B, torch.float32, dev, "temperature")
    top_k = as_row_tensor(top_k, B, torch.long, dev, "top_k")
    top_p = as_row_tensor(top_p, B, torch.float32, dev, "top_p")
    min_p = as_row_tensor(min_p, B, torch.float32, dev, "min_p")
    ninf = float("-inf")

    x = logits.float()
    is_greedy = temperature == 0
    x = x / torch.where(is_greedy, 1.0, temperature)[:, None]

    # top-k: threshold at the k-th largest value (k = 0 or >= V keeps everything).
    k_eff = torch.where((top_k <= 0) | (top_k > V), V, top_k)
    sorted_x, sorted_idx = torch.sort(x, dim=-1, descending=True, stable=True)
    kth = sorted_x.gather(1, (k_eff - 1)[:, None])  # (B, 1)
    x = x.masked_fill(x < kth, ninf)

    # top-p over what top-k kept, in the same descending order.
    sorted_x = sorted_x.masked_fill(sorted_x < kth, ninf)
    sorted_p = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # exclusive prefix sum
    # top_p >= 1 keeps everything (a float cumsum can reach 1.0 before the tail ends).
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
    x = x.masked_fill(drop, ninf)

    # min-p relative to the most likely token.
    p = torch.softmax(x, dim=-1)
    p_max = p.max(dim=-1, keepdim=True).values
    x = x.masked_fill(p < min_p[:, None] * p_max, ninf)

    # Greedy rows keep only their argmax (lowest index among ties, as torch.argmax).
    am = logits.float().argmax(dim=-1)
    only_argmax = torch.full_like(x, ninf).scatter(1, am[:, None], 0.0)
    return torch.where(is_greedy[:, None], only_argmax, x)


def sampling_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The exact distribution a sampler must draw from, in float64: ``(B, V)``, rows sum to 1."""
    return torch.softmax(filter_logits(logits.double(), temperature, top_k, top_p, min_p).double(), dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``(B, V) -> (B,)`` int64: the argmax, lowest index among ties."""
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    generator: torch.Generator | None = None,
    *,
    status: torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Draw one token per row from :func:`sampling_probs` without a host sync.

    Exponential race: ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` i.i.d. picks ``i`` with
    probability ``p_i`` (the minimum of ``E_i / p_i`` is attained by ``i`` w.p. ``p_i``), and
    unlike ``torch.multinomial`` it never copies anything to the host.

    ``status``: optional ``(B, 2)`` int32 tensor on the logits' device, zeroed by the caller; the
    same flags as the fused sampler (contract C1, see :func:`sampling_status`), ``status[b, 1]``
    set to ``step`` at a row's first bad step. A flagged row returns its argmax (in range).
    """
    tokens = torch.softmax(filter_logits(logits, temperature, top_k, top_p, min_p), dim=-1)
    race = torch.empty_like(tokens).exponential_(generator=generator)
    tokens = (tokens / race).argmax(dim=-1)
    if status is not None:
        bad = record_sampling_status(status, logits, temperature, step)
        tokens = torch.where(bad, logits.argmax(dim=-1), tokens)
    return tokens


#: Bits of ``status[b, 0]`` (contract C1): why a sampling row could not be sampled.
STATUS_NAN, STATUS_POS_INF, STATUS_NO_TOKEN = 1, 2, 4


def sampling_status(logits: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """``(B,)`` int32 flags of each row's scaled scores ``logits / temperature`` (float32).

    ``STATUS_NAN`` when they contain NaN, ``STATUS_POS_INF`` when they contain +inf (also from an
    overflowing division), ``STATUS_NO_TOKEN`` when every score is -inf (and none is NaN): no token
    has a non-zero probability. Greedy rows (temperature 0) are never flagged.
    """
    B = logits.shape[0]
    temperature = as_row_tensor(temperature, B, torch.float32, logits.device, "temperature")
    is_greedy = temperature == 0
    x = logits.float() / torch.where(is_greedy, 1.0, temperature)[:, None]  # (B, V)
    has_nan = torch.isnan(x).any(dim=-1)
    flags = has_nan.int() * STATUS_NAN
    flags |= torch.isposinf(x).any(dim=-1).int() * STATUS_POS_INF
    flags |= ((x == float("-inf")).all(dim=-1) & ~has_nan).int() * STATUS_NO_TOKEN
    return torch.where(is_greedy, 0, flags).to(torch.int32)


def record_sampling_status(status: torch.Tensor, logits: torch.Tensor, temperature, step) -> torch.Tensor:
    """Fold :func:`sampling_status` into ``status`` in place (no host sync); returns the ``(B,)`` bad-row mask.

    ``status[b, 0] |= flags``; ``status[b, 1] = step`` for a row flagged now and not before.
    """
    B = logits.shape[0]
    if status.dtype != torch.int32 or status.dim() != 2 or status.shape[0] < B or status.shape[1] != 2:
        raise ValueError(f"status must be a ({B}, 2) int32 tensor, got {status.dtype} of shape {tuple(status.shape)}")
    flags = sampling_status(logits, temperature)
    bad = flags != 0
    step = torch.as_tensor(step, device=status.device).to(torch.int32).reshape(-1)[:1]
    first = bad & (status[:B, 0] == 0)
    status[:B, 1] = torch.where(first, step, status[:B, 1])
    status[:B, 0] |= flags
    return bad


# --------------------------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------------------------
def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dimension of a 2-D tensor.

    Values sorted descending; equal values ordered by ascending index; NaN ranks above +inf (as in
    ``torch.topk``), NaNs among themselves by ascending index. Returns ``(values, int64 indices)``.
    """
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


# --------------------------------------------------------------------------------------------
# Layer ops: LayerNorm with a residual add, linear with fused LayerNorm / bias / GELU / residual
# --------------------------------------------------------------------------------------------
__all__ += ["LINEAR_ACTIVATIONS", "GELU_APPROXIMATE", "NORMS", "activate", "add_layernorm", "add_rmsnorm", "linear"]

#: GELU activations by name -> ``F.gelu``'s ``approximate`` argument. GPT-2 uses ``"gelu_tanh"``
#: (Hugging Face's ``gelu_new``; the HF names map onto these in ``fastgpt.config.ACTIVATIONS``).
GELU_APPROXIMATE = {"gelu_tanh": "tanh", "gelu": "none"}

#: Every activation a fused linear may apply (the kernels' codes derive from this table):
#: the GELUs, and ``"silu_glu"``, the gated SiLU of a SwiGLU MLP, which halves the width (see
#: :func:`activate`).
LINEAR_ACTIVATIONS = (*GELU_APPROXIMATE, "silu_glu")

#: The normalisations a fused linear may apply to its input (``linear(norm=...)``).
NORMS = ("layernorm", "rmsnorm")


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply a :data:`LINEAR_ACTIVATIONS` activation to a projection's output ``y`` ``(..., N)``.

    ``"silu_glu"``: ``y``'s columns are (gate, up) pairs -- the gate and up projections of a
    SwiGLU MLP stored row-interleaved in one weight, row ``2j`` gate ``j``, row ``2j + 1`` up
    ``j`` -- and the result is ``silu(gate) * up``, ``(..., N/2)``. Each pair sits in adjacent
    columns, so a GEMV tile of even width holds whole pairs and applies this in its epilogue.
    Each op rounds to the dtype, as Hugging Face's ``act(gate_proj(x)) * up_proj(x)``.
    """
    if activation is None:
        return y
    if activation == "silu_glu":
        if y.shape[-1] % 2:
            raise ValueError(f"silu_glu needs an even number of columns (gate, up pairs), got {y.shape[-1]}")
        pairs = y.unflatten(-1, (y.shape[-1] // 2, 2))  # (..., N) -> (..., N/2, 2)
        return F.silu(pairs[..., 0]) * pairs[..., 1]
    if activation in GELU_APPROXIMATE:
        return F.gelu(y, approximate=GELU_APPROXIMATE[activation])
    raise ValueError(f"activation must be None or one of {list(LINEAR_ACTIVATIONS)}, got {activation!r}")


def add_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (``x`` when None), ``h = LayerNorm(s)`` over the last dimension.

    ``s`` is rounded to ``x``'s dtype before it is normalised (exactly what ``x + residual``
    followed by ``F.layer_norm`` computes), the variance is the biased one, and
    ``h = (s - mean) / sqrt(var + eps) * weight + bias``. Returns ``(h, s)``.
    """
    s = x if residual is None else x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def rms_norm(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's ``LlamaRMSNorm``: ``weight * (s / sqrt(mean(s^2) + eps))``, the statistics
    and the division in float32, the normalised row rounded to ``s``'s dtype before the weight
    multiplies it (in the dtype)."""
    s32 = s.to(torch.float32)
    normed = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(s.dtype)


def add_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (``x`` when None), ``h = RMSNorm(s)`` (:func:`rms_norm`). Returns ``(h, s)``."""
    s = x if residual is None else x + residual
    return rms_norm(s, weight, eps), s


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    norm: str = "layernorm",
) -> torch.Tensor:
    """``residual + act(norm(x) @ weight.T + bias)``, each stage optional, in ``x``'s dtype.

    Parameters
    ----------
    x : (..., K)
    weight : (N, K), ``nn.Linear`` layout.
    bias : (N,) or None.
    activation : None or one of :data:`LINEAR_ACTIVATIONS` (:func:`activate`); ``"silu_glu"``
        makes the output ``(..., N/2)``.
    residual : (..., N) (``(..., N/2)`` with ``"silu_glu"``) or None, added last.
    ln_weight, ln_bias : (K,) -- when ``ln_weight`` is given, ``x`` is first normalised (eps
        ``ln_eps``): ``norm="layernorm"`` (``ln_bias`` required) or ``"rmsnorm"`` (:func:`rms_norm`,
        ``ln_bias`` must be None).

    Each stage runs as its own PyTorch op and rounds to the dtype, which is how the unfused model
    computes it (``x + c_proj(...)``, ``F.gelu(c_fc(ln_2(x)))``); fused kernels round once, at the
    end, and are compared with this function evaluated in float64.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "layernorm" and (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together")
    if norm == "rmsnorm" and ln_bias is not None:
        raise ValueError("norm='rmsnorm' takes no ln_bias")
    if activation is not None and activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {list(LINEAR_ACTIVATIONS)}, got {activation!r}")
    if ln_weight is not None:
        if norm == "rmsnorm":
            x = rms_norm(x, ln_weight, ln_eps)
        else:
            x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    y = activate(F.linear(x, weight, bias), activation)
    if residual is not None:
        y = residual + y
    return y
