"""The preallocated KV cache: one buffer per generate() call, written in place, never grown.

Layout: ``k, v`` are ``(n_layer, B, H, S_max, D)``; layer ``l`` uses the contiguous views
``k[l], v[l]`` of shape ``(B, H, S_max, D)`` (the layout the attention kernels read). ``H`` is the
number of K/V heads: ``n_head`` for GPT-2, ``n_kv_head`` for a grouped-query (LLaMA-family) model,
whose cache is smaller by the group size. The LLaMA family's keys are stored already rotated.
Slot ``j`` of row ``b`` holds the token at position ``j - row_start[b]``; rows are left padded,
so slots before ``row_start[b]`` are padding and never attended to.

``pos`` is the slot of the next token to be written, kept twice: a host int for the eager
PyTorch path (slicing without a sync) and a device tensor ``pos_tensor`` for the kernels and the
CUDA graph (whose replays must not depend on host values).

How long a generation's cache is: :func:`bucket_length` rounds ``prompt + max_new_tokens`` up to a
bucket, so that calls of many lengths share one shape (one captured CUDA graph, one attention
split count) at a bounded cost in unused slots.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache", "bucket_length", "BUCKET_STEP"]

#: Cache lengths up to ``4 * BUCKET_STEP`` are multiples of it; above, two buckets per octave.
BUCKET_STEP = 256


def bucket_length(n_tokens: int, n_positions: int) -> int:
    """The cache length for a generation of ``n_tokens`` (prompt + max_new_tokens) slots.

    Rule: a multiple of ``BUCKET_STEP`` (256, 512, 768, 1024) up to 1024, then a multiple of a
    quarter of the next power of two (1536, 2048, 3072, 4096, ...), clamped to ``n_positions``.
    So chat-like calls at GPT-2's 1024 positions share at most 4 shapes, and the unused slots
    are fewer than 256 or under a third of the cache (``n_tokens`` just above ``2^k`` gets
    ``1.5 * 2^k``). The attention kernels' split count is a function of the cache length, so
    eager and graph decoding of one call, which both use this length, sum in the same order.

    Raises ``ValueError`` unless ``1 <= n_tokens <= n_positions``.
    """
    if not 1 <= n_tokens <= n_positions:
        raise ValueError(f"n_tokens must be in [1, n_positions={n_positions}], got {n_tokens}")
    step = max(BUCKET_STEP, (1 << (n_tokens - 1).bit_length()) // 4)
    return min(-(-n_tokens // step) * step, n_positions)


class KVCache:
    """Preallocated key/value cache for ``batch`` rows of up to ``max_len`` tokens."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in (("n_layer", n_layer), ("batch", batch), ("n_head", n_head), ("max_len", max_len),
                            ("head_dim", head_dim)):  # fmt: skip
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        device = torch.device(device)
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.row_start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.has_padding = False
        self.pos = 0
        self.pos_tensor = torch.zeros(1, dtype=torch.int32, device=device)
        self.batch, self.n_head, self.max_len, self.head_dim = batch, n_head, max_len, head_dim
        #: Scratch a kernel backend may attach once (e.g. flash-decoding split partials).
        self.workspace: dict[str, object] = {}
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(B, H, S_max, D)`` key and value buffers of one layer."""
        return self.k[index], self.v[index]

    def set_row_start(self, row_start: torch.Tensor | None) -> None:
        """Record left padding: ``row_start[b]`` pad slots in front of row ``b``."""
        if row_start is None:
            self.row_start.zero_()
            self.has_padding = False
            return
        self.row_start.copy_(row_start)
        self.has_padding = True

    def reset(self) -> None:
        """Start over at slot 0 (the buffers are reused, their contents overwritten as we go)."""
        self.pos = 0
        self.pos_tensor.zero_()
        self.set_row_start(None)

    def advance(self, n_tokens: int, *, device: bool = True) -> None:
        """Move past ``n_tokens`` just written, on the host and (``device``) on the device; with
        ``device=False`` the caller advances ``pos_tensor`` itself (the decode step's sampler)."""
        if self.pos + n_tokens > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {n_tokens} tokens > max_len {self.max_len}")
        self.pos += n_tokens
        if device:
            self.pos_tensor.add_(n_tokens)

    def reorder_rows(self, row_index: torch.Tensor) -> None:
        """Make row ``b`` a copy of row ``row_index[b]`` (beam search), for the slots written so far.

        A permutation cannot be gathered into the buffer it reads from, so the first call allocates
        one spare buffer pair of the same size; later calls gather into it and swap, with no new
        allocation per step.
        """
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        spare_k, spare_v = self._spare
        # Whole-buffer gathers into the preallocated spare (index_select's out= needs a contiguous
        # destination, and the live slots [:pos] are a strided slice of it).
        torch.index_select(self.k, 1, row_index, out=spare_k)
        torch.index_select(self.v, 1, row_index, out=spare_v)
        self._spare = (self.k, self.v)
        self.k, self.v = spare_k, spare_v
        self.row_start.copy_(self.row_start[row_index])
