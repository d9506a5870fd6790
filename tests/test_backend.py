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


def test_run_report_holds_dispatch_the_last_generate_and_the_launch_record(monkeypatch):
    """Contract C2: one dict; the kernels' launch record is read from fastgpt.kernels.utils."""
    import fastgpt
    import fastgpt.kernels.utils as kernel_utils

    monkeypatch.setattr(kernel_utils, "launch_record", lambda: {"sample": {"impl": "triton", "path": 3}}, raising=False)
    _, model = pair("tiny-503")
    reset_kernels_report()
    model.generate(torch.randint(0, 503, (1, 3)), 4)
    report = fastgpt.run_report()
    assert report["dispatch"] == kernels_report() and report["dispatch"]["sample"] == "torch:greedy"
    assert report["generate"]["loop"] == "fast" and report["generate"]["decode_steps"] == 3
    assert report["launches"] == {"sample": {"impl": "triton", "path": 3}}


def test_the_sampler_gets_the_status_flags_when_it_takes_them(monkeypatch):
    """Contract C1, generation side: SamplingState.status (B, 2) int32 zeroed, passed as status=,
    the same tensor every step (never reallocated)."""
    from fastgpt import backend

    seen = []

    def sample(logits, temperature, top_k, top_p, min_p, generator=None, status=None, step=None):
        seen.append((status, int(step)))
        return logits.argmax(dim=-1)

    monkeypatch.setattr(reference, "sample", sample)
    state = backend.SamplingState(3, torch.device("cpu"), temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    assert state.status.shape == (3, 2) and state.status.dtype == torch.int32 and not state.status.any()
    for _ in range(2):
        backend.select_next_token(torch.randn(3, 7), state, "torch")
    assert seen[0][0] is state.status and seen[1][0] is state.status
    assert [s for _, s in seen] == [0, 1]  # the RNG step of each call
