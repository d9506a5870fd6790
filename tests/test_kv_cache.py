"""The preallocated KV cache: in-place writes, no growth, row reordering for beam search."""

import pytest
import torch

from fastgpt import KVCache


def make_cache(batch=3, max_len=10):
    return KVCache(n_layer=2, batch=batch, n_head=2, max_len=max_len, head_dim=4, dtype=torch.float32, device="cpu")


def test_cache_is_allocated_once_at_full_size():
    cache = make_cache()
    ptr = cache.k.data_ptr()
    assert cache.k.shape == (2, 3, 2, 10, 4)
    cache.advance(4)
    cache.advance(1)
    assert cache.k.data_ptr() == ptr and cache.pos == 5 and int(cache.pos_tensor) == 5


def test_cache_overflow_raises():
    cache = make_cache(max_len=4)
    cache.advance(3)
    with pytest.raises(ValueError, match="overflow"):
        cache.advance(2)


def test_reorder_rows_gathers_rows_in_place_without_new_buffers_per_call():
    cache = make_cache()
    cache.k.copy_(torch.arange(3.0)[None, :, None, None, None].expand_as(cache.k))
    cache.v.copy_(cache.k * 10)
    cache.set_row_start(torch.tensor([0, 1, 2], dtype=torch.int32))
    cache.advance(5)
    order = torch.tensor([2, 2, 0])
    cache.reorder_rows(order)
    assert torch.equal(cache.k[0, :, 0, 0, 0], torch.tensor([2.0, 2.0, 0.0]))
    assert torch.equal(cache.v[1, :, 1, 3, 2], torch.tensor([20.0, 20.0, 0.0]))
    assert cache.row_start.tolist() == [2, 2, 0]
    buffers = {cache.k.data_ptr(), cache._spare[0].data_ptr()}
    cache.reorder_rows(torch.tensor([1, 0, 2]))
    assert {cache.k.data_ptr(), cache._spare[0].data_ptr()} == buffers  # ping-pong, nothing new
    assert torch.equal(cache.k[0, :, 0, 0, 0], torch.tensor([2.0, 2.0, 0.0]))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="KVCache batch must be >= 1, got 0"):
        make_cache(batch=0)
