"""LLaMA-family models on the Triton kernels (the interpreter on a CPU): every op of the model runs
its fused kernel -- RMSNorm in the GEMV prologue, SwiGLU in its epilogue, grouped-query attention
with the rotary embedding in the attention kernels, the out-projection combining the attention's
split partials -- and the logits and greedy tokens equal transformers'.

Each test asserts which implementation ran (``kernels_report``), so a silent fallback to PyTorch
fails. Kernel-by-kernel tests against the reference ops: tests/test_attention_*.py, test_linear.py,
test_layernorm.py.
"""

from __future__ import annotations

import pytest
import torch

from fastgpt import GPT, kernels_report, last_generate_stats, reset_kernels_report
from tests.helpers import emulate_graph_replay, left_padded
from tests.models import hf_llama_family

#: What must run on a Triton kernel in a LLaMA decode step (op -> implementation).
DECODE_KERNELS = {
    "linear.qkv.gemv": "triton",
    "attention.decode": "triton",
    "attention.combine": "attn_proj",
    "linear.attn_proj.gemv": "triton",
    "linear.fc.gemv": "triton",
    "linear.mlp_proj.gemv": "triton",
    "linear.lm_head.gemv": "triton",
    "sample": "triton",
}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    reset_kernels_report()


@pytest.mark.parametrize(
    "model_type, shape, tied, rope_scaling",
    [("llama", "gqa-9-3", False, True), ("qwen2", "mqa-4-1", True, False), ("mistral", "hd128-4-2", False, False)],
)
def test_prefill_and_decode_logits_match_transformers(triton_backend, model_type, shape, tied, rope_scaling):
    hf = hf_llama_family(model_type, shape, n_layer=1, vocab=97, tied=tied, rope_scaling=rope_scaling)
    model = GPT.from_hf(hf)
    ids, mask = left_padded(97, [6, 4], pad_id=0, seed=5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate passes for left padding
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        cache = model.new_cache(2, 8)
        cache.set_row_start((mask == 0).sum(1).to(torch.int32))
        prefill = model(ids[:, :5], cache)
        step = model(ids[:, 5:], cache)
    ran = kernels_report()
    assert ran["attention.prefill"] == "triton" and ran["attention.decode"] == "triton"
    assert ran["attention.combine"] == "attn_proj"
    assert all(ran[f"linear.{op}.gemv"] == "triton" for op in ("qkv", "attn_proj", "fc", "mlp_proj", "lm_head"))
    got = torch.cat([prefill, step], 1)
    real = mask.bool()  # pad queries' logits are not defined the same way in HF
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_generate_greedy_equals_transformers_through_the_graph_step(triton_backend, monkeypatch):
    """The decode step HF-equal on the kernels, through the CUDA-graph code path (replay emulated)."""
    emulate_graph_replay(monkeypatch)
    hf = hf_llama_family("llama", "gqa-9-3", n_layer=1, vocab=97, rope_scaling=True)
    model = GPT.from_hf(hf)
    ids, mask = left_padded(97, [5, 3], pad_id=0, seed=6)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(got, expected)
    assert last_generate_stats()["path"] == "graph"
    ran = kernels_report()
    assert {op: ran.get(op) for op in DECODE_KERNELS} == DECODE_KERNELS
