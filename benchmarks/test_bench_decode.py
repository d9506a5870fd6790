"""pytest-benchmark microbenchmarks of one decode step: ``pytest benchmarks/ --benchmark-only``.

* CPU (always): a tiny model's eager step with the PyTorch backend.
* CUDA (when present): GPT-2 small, fp16, batch 1, 128-token context: the eager Triton step and
  the CUDA-graph replay. Each call synchronises, so a round is one step's latency (launch + GPU).

The benchmark decides how many calls it makes; when a session nears the end of its KV cache it
wraps back to the prompt's end (the context length cycles within ``[T, T + WINDOW)``).
Not collected by ``pytest tests`` (the test suite's ``testpaths``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.profile import Session, build_model  # noqa: E402

WINDOW = 64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_graphs():
    from fastgpt.cuda_graph import clear_graph_cache

    clear_graph_cache()
    yield
    clear_graph_cache()


def _stepper(session: Session, prompt_len: int):
    cache = session.decoder.cache

    def one_step():
        if cache.pos >= prompt_len + WINDOW - 1:
            cache.pos = prompt_len  # wrap: host and device positions together
            cache.pos_tensor.fill_(prompt_len)
            session.left = WINDOW
        session.run(1)
        session.sync()

    return one_step


def _bench(benchmark, model, batch: int, prompt_len: int):
    session = Session(model, batch, prompt_len, WINDOW)
    try:
        step = _stepper(session, prompt_len)
        for _ in range(3):
            step()
        benchmark(step)
    finally:
        session.close()
    benchmark.extra_info.update(path="graph" if session.graph is not None else "eager", batch=batch, context=prompt_len)


def test_decode_step_cpu_torch_backend(benchmark, monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    _bench(benchmark, build_model("tiny", torch.float32, torch.device("cpu")), 1, 16)


@needs_cuda
def test_decode_step_cuda_triton_eager(benchmark, monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "0")
    _bench(benchmark, build_model("gpt2", torch.float16, torch.device("cuda")), 1, 128)


@needs_cuda
def test_decode_step_cuda_graph(benchmark, monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    monkeypatch.setenv("FASTGPT_CUDA_GRAPH", "1")
    _bench(benchmark, build_model("gpt2", torch.float16, torch.device("cuda")), 1, 128)
    assert benchmark.extra_info["path"] == "graph"
