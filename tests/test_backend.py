"""The kernel boundary: FASTGPT_BACKEND selection, and the whole model end to end on the Triton
kernels (in the interpreter on the CPU, compiled on CUDA) against the PyTorch backend."""

import pytest
import torch

from fastgpt import kernels_report, reference, reset_kernels_report
from fastgpt.backend import resolve_backend
from fastgpt.kernels.utils import interpreting
from tests.models import pair

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="the Triton kernels need CUDA or TRITON_INTERPRET=1"
)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    monkeypatch.delenv("FASTGPT_BACKEND")
    assert resolve_backend("cpu") == "torch"  # auto: the CPU default is the reference path
    monkeypatch.setenv("FASTGPT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND must be one of"):
        resolve_backend("cpu")
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("cpu")


@needs_kernels
def test_greedy_tokens_on_the_triton_backend_equal_torch_backend_and_hf(monkeypatch):
    hf, model = pair("hd64-257")
    hf, model = hf.to(DEVICE), model.to(DEVICE)
    ids = torch.randint(0, 257, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    expected = model.generate(ids, 8, attention_mask=mask, pad_token_id=0)
    assert torch.equal(expected, hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    reset_kernels_report()
    got = model.generate(ids, 8, attention_mask=mask, pad_token_id=0)
    report = kernels_report()
    assert torch.equal(got, expected)
    assert report["attention.prefill"] == "triton" and report["attention.decode"] == "triton", report
    assert report["sample"] == "triton", report


@needs_kernels
def test_sampling_on_the_triton_backend_is_reproducible_and_inside_the_kept_set(monkeypatch):
    _, model = pair("hd64-257")
    model = model.to(DEVICE)
    prompt = torch.randint(0, 257, (1, 5), device=DEVICE)
    ids = prompt.expand(8, 5).contiguous()
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    reset_kernels_report()
    a = model.generate(ids, 1, seed=3, **settings)
    assert kernels_report()["sample"] == "triton"
    assert torch.equal(a, model.generate(ids, 1, seed=3, **settings))
    assert not torch.equal(a, model.generate(ids, 1, seed=4, **settings))
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    with torch.no_grad():
        logits = model(prompt)[:, -1]
    kept = reference.filter_logits(logits, 0.8, 20, 0.9)[0] > float("-inf")
    assert kept[a[:, -1]].all()
    assert len(set(a[:, -1].tolist())) > 1  # 8 independent rows do not all draw one token


@needs_kernels
def test_unsupported_head_dim_runs_graph_safe_torch_attention_with_one_warning(monkeypatch):
    _, model = pair("tiny-503")  # head_dim 16
    model = model.to(DEVICE)
    ids = torch.randint(0, 503, (1, 4), device=DEVICE)
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    expected = model.generate(ids, 4)
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    reset_kernels_report()
    with pytest.warns(UserWarning, match="head_dim"):
        got = model.generate(ids, 4)
    assert torch.equal(got, expected)
    assert kernels_report()["attention"] == "torch:attention_at"
