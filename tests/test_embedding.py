"""kernels/embedding.py: wte[ids] + wpe[positions] in one launch, against the PyTorch reference.

Bit-exact: both round the float32 sum to the dtype once. The Triton 3.6 interpreter truncates
float32 -> bfloat16 where the GPU rounds to nearest, so under the interpreter the bfloat16
reference truncates too (still exact: the test emulates, it does not loosen).
"""

from __future__ import annotations

import pytest
import torch

from fastgpt.kernels import embedding
from fastgpt.kernels.utils import interpreting, launch_record, reset_launch_record

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def reference_embed(ids, wte, wpe, cache_pos, row_start):
    """The unfused model's embedding: positions of the cache slots, pad slots at 0, then the add."""
    T = ids.shape[1]
    slots = cache_pos.long() + torch.arange(T)  # (T,)
    positions = (slots[None, :] - row_start.long()[:, None]).clamp(min=0)  # (B, T)
    total = wte[ids].float() + wpe[positions].float()  # (B, T, C) float32, exact
    if wte.dtype == torch.bfloat16 and interpreting():
        return (total.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # truncation
    return total.to(wte.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,C,pos", [(1, 1, 64, 5), (3, 4, 100, 0), (2, 1, 1600, 17), (2, 3, 33, 9)])
def test_matches_the_reference(dtype, B, T, C, pos):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + C)
    vocab, n_pos = 211, 40
    wte = torch.randn(vocab, C, generator=g).to(dtype)
    wpe = torch.randn(n_pos, C, generator=g).to(dtype)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    row_start = torch.randint(0, pos + T, (B,), generator=g).to(torch.int32)
    cache_pos = torch.tensor([pos], dtype=torch.int32)
    out = torch.full((B, T, C), float("nan"), dtype=dtype)  # poisoned: every element must be written
    reset_launch_record()
    got = embedding.embed(ids, wte, wpe, cache_pos, row_start, out=out)
    assert got is out
    assert launch_record()["embedding"]["impl"] == "triton"
    torch.testing.assert_close(got, reference_embed(ids, wte, wpe, cache_pos, row_start), atol=0, rtol=0)


def test_reads_a_strided_view_of_the_input_buffer():
    wte, wpe = torch.randn(50, 64), torch.randn(16, 64)
    buffer = torch.tensor([7, 3, 41], dtype=torch.long)
    ids = buffer[:, None]  # (B, 1) view, the decode step's input
    got = embedding.embed(ids, wte, wpe, torch.tensor([4], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32))
    ref = reference_embed(ids, wte, wpe, torch.tensor([4]), torch.tensor([0, 2, 5]))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_out_of_range_ids_and_positions_give_nan_rows():
    wte, wpe = torch.randn(10, 32), torch.randn(4, 32)
    ids = torch.tensor([[3, 10, -1, 2]])
    got = embedding.embed(ids, wte, wpe, torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    assert torch.isnan(got[0, 1]).all() and torch.isnan(got[0, 2]).all()
    torch.testing.assert_close(got[0, 0], wte[3] + wpe[0], atol=0, rtol=0)
    torch.testing.assert_close(got[0, 3], wte[2] + wpe[3], atol=0, rtol=0)
    past = embedding.embed(ids[:, :1], wte, wpe, torch.tensor([4], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    assert torch.isnan(past).all()  # position 4 >= n_positions


def _args():
    return dict(
        ids=torch.zeros((1, 1), dtype=torch.long), wte=torch.randn(5, 8), wpe=torch.randn(4, 8),
        cache_pos=torch.zeros(1, dtype=torch.int32), row_start=torch.zeros(1, dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(ids=torch.zeros((1, 1), dtype=torch.float32)), TypeError, "ids must have dtype"),
        (dict(ids=torch.zeros(1, dtype=torch.long)), ValueError, "ids must have 2 dimensions"),
        (dict(wpe=torch.randn(4, 9)), ValueError, "wpe must have 8 columns"),
        (dict(wpe=torch.randn(4, 8, dtype=torch.float64)), TypeError, "wpe must have dtype"),
        (dict(cache_pos=torch.zeros(1, dtype=torch.int64)), TypeError, "cache_pos must have dtype"),
        (dict(row_start=torch.zeros(2, dtype=torch.int32)), ValueError, r"row_start must have shape \(1,\)"),
        (dict(out=torch.empty(1, 1, 7)), ValueError, "out must be a contiguous"),
    ],
)
def test_bad_input_raises_before_any_launch(change, error, message):
    args = {**_args(), **change}
    reset_launch_record()
    with pytest.raises(error, match=message):
        embedding.embed(args.pop("ids"), args.pop("wte"), args.pop("wpe"), args.pop("cache_pos"), args.pop("row_start"), **args)
    assert "embedding" not in launch_record()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compiles_for_sm90_with_programmatic_dependent_launch(dtype):
    """The GPU build (USE_PDL on): the token and position are read after griddepcontrol.wait (the
    previous step's sampler wrote them) and dependents are released before the store."""
    from fastgpt.kernels.utils import compile_for_hopper, triton_dtype

    ptr = "*" + triton_dtype(dtype)
    signature = {
        "ids_ptr": "*i64", "stride_ib": "i32", "stride_it": "i32", "T": "i32", "wte_ptr": ptr, "n_vocab": "i32",
        "wpe_ptr": ptr, "n_pos": "i32", "cache_pos_ptr": "*i32", "row_start_ptr": "*i32", "out_ptr": ptr, "C": "i32",
        "BLOCK": "constexpr", "USE_PDL": "constexpr",
    }  # fmt: skip
    compiled = compile_for_hopper(embedding._embedding_kernel, signature, {"BLOCK": 1024, "USE_PDL": True}, 4, 1)
    ptx = compiled.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    plain = compile_for_hopper(embedding._embedding_kernel, signature, {"BLOCK": 1024, "USE_PDL": False}, 4, 1)
    assert "griddepcontrol" not in plain.asm["ptx"]
