"""Launches per decode token (issue 14): at most 5 per layer and 4 outside the layers; the LLaMA
family (issue 15) no more per layer than GPT-2.

Counted on the CPU by :func:`benchmarks.launch_count.count_decode_launches` for the real layer
structures (gpt2: 12 layers, gpt2-xl: 48; head_dim 64, tiny width and vocabulary -- launches do
not depend on width), greedy and sampling, with and without EOS, with the Triton backend: what a
CUDA graph captures (``Decoder.step_into``). Also: no host sync in the step; the counter itself
sees what it must (ATen ops that launch, not views; Triton launches; per-layer attribution).

The LLaMA family is counted the same way on the presets' structures (``llama-3.2-1b``: 16
layers, 4 query heads per K/V head; ``qwen2.5-0.5b``: 24 layers, 7 per K/V head, Q/K/V biases;
``smollm2-135m``: 30 layers, 3 per K/V head): RMSNorm, the rotary embedding and SwiGLU ride in
the GEMVs' prologues and epilogues and the attention, so a layer launches no more than GPT-2's
(counted here, 5).
"""

from __future__ import annotations

import pytest
import torch

import inspect

from benchmarks.launch_count import LaunchCounter, _watching_triton, count_decode_launches, structure_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: (layers, budget per token): 5 per layer + 4 outside (embedding, ln_f + LM head, 2 sampler).
BUDGET = {"gpt2": (12, 64), "gpt2-xl": (48, 244)}
OPTIONS = {
    "greedy": dict(),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1),
    "greedy-eos": dict(eos_token_id=[3, 5, 11]),
    "sampling-eos-min-new": dict(do_sample=True, temperature=0.7, seed=2, eos_token_id=[3, 5], min_new_tokens=4),
}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")


@pytest.fixture(scope="module")
def models():
    return {name: structure_model(name) for name in BUDGET}


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("name", list(BUDGET))
def test_decode_step_within_the_launch_budget(name, case, models, triton_backend):
    n_layer, budget = BUDGET[name]
    counts = count_decode_launches(models[name], batch=2, **OPTIONS[case])
    assert counts["backend"] == "triton"  # the counted path is the Triton one, not a fallback
    assert counts["layers"] == n_layer
    assert counts["host_syncs"] == 0, counts["host_sync_ops"]
    assert max(counts["per_layer"]) <= 5, counts["ops_layer0"]
    assert counts["outside_layers"] <= 4, counts["ops_outside"]
    assert counts["launches_per_token"] == sum(counts["per_layer"]) + counts["outside_layers"]
    assert counts["launches_per_token"] <= budget
    # What runs outside the layers: one embedding, the LM head, the sampler's two kernels.
    assert counts["ops_outside"] == {
        "triton._embedding_kernel": 1, "triton._gemv_kernel": 1, "triton._chunk_kernel": 1, "triton._row_kernel": 1,
    }  # fmt: skip


@pytest.mark.parametrize("name", ["gpt2", "llama-3.2-1b"])
def test_counting_without_running_kernels_counts_the_same(triton_backend, name):
    """The fast count (kernels launched, not executed; valid token ids fed to the LLaMA family's
    ATen embedding) equals the count of a real interpreted step."""
    model = structure_model(name, n_positions=32)
    model.h = model.h[:2]  # two layers: the interpreter runs every kernel
    options = OPTIONS["sampling-eos-min-new"]
    real = count_decode_launches(model, run_kernels=True, **options)
    fast = count_decode_launches(model, run_kernels=False, **options)
    for key in ("launches_per_token", "per_layer", "outside_layers", "ops_outside", "ops_layer0", "host_syncs"):
        assert real[key] == fast[key], key


def test_the_counter_counts_launching_ops_not_views():
    counter = LaunchCounter()
    x = torch.randn(4, 6)
    with counter:
        counter.on = True
        y = x.view(6, 4).t()[1:]  # views: no launch
        z = y + 1  # one
        z.add_(2)  # one (in place)
        z.copy_(y)  # one (a copy)
        _ = torch.empty(3)  # an allocation: no launch
        _ = bool(z.sum() > 0)  # two launches and a host sync
    assert sum(counter.per_region().values()) == 5, dict(counter.counts)
    assert sum(counter.host_syncs.values()) == 1


def test_the_counter_sees_triton_launches(triton_backend):
    from fastgpt.kernels import embedding

    counter = LaunchCounter()
    args = (torch.zeros((1, 1), dtype=torch.long), torch.randn(5, 8), torch.randn(4, 8),
            torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))  # fmt: skip
    with _watching_triton(counter, run_kernels=False), counter:
        counter.on = True
        embedding.embed(*args)
        embedding.embed(*args)
    assert dict(counter.counts) == {("outside", "triton._embedding_kernel"): 2}


def test_the_torch_backend_oracle_is_counted_too(monkeypatch):
    """The PyTorch path (the oracle) is not held to the budget, but the counter runs on it."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    model = structure_model("gpt2", dtype=torch.float32)
    counts = count_decode_launches(model, **OPTIONS["greedy-eos"])
    assert counts["backend"] == "torch" and counts["host_syncs"] == 0
    assert counts["launches_per_token"] > 64  # separate ops: why the Triton path exists


@pytest.mark.parametrize("name", list(BUDGET))
def test_several_attention_splits_stay_within_the_budget(name, models, triton_backend, monkeypatch):
    """Long caches split the attention (flash-decoding); the split combine rides in the
    out-projection's launch, so a layer stays at 5 launches (a GPU's split count, forced here)."""
    from fastgpt.kernels import attention_decode

    monkeypatch.setattr(attention_decode, "decode_num_splits", lambda *args, **kwargs: 4)
    n_layer, budget = BUDGET[name]
    counts = count_decode_launches(models[name], max_new_tokens=40, **OPTIONS["sampling-eos-min-new"])
    assert max(counts["per_layer"]) <= 5, counts["ops_layer0"]
    assert counts["launches_per_token"] <= budget


# --------------------------------------------------------------------------------------------
# The LLaMA family (issue 15): no more launches per layer than GPT-2
# --------------------------------------------------------------------------------------------
#: Preset -> layers of its structure model.
LLAMA_LAYERS = {"llama-3.2-1b": 16, "qwen2.5-0.5b": 24, "smollm2-135m": 30}


@pytest.fixture(scope="module")
def gpt2_per_layer():
    """GPT-2's launches per layer, counted with the same machinery (the LLaMA family's budget)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGPT_BACKEND", "triton")
        counts = count_decode_launches(structure_model("gpt2"), batch=2)
    assert counts["backend"] == "triton" and max(counts["per_layer"]) == 5
    return max(counts["per_layer"])


def test_llama_structure_models_keep_the_presets_layers_and_grouping():
    from fastgpt import GPTConfig

    for name, n_layer in LLAMA_LAYERS.items():
        preset, model = GPTConfig.from_preset(name), structure_model(name)
        c = model.config
        assert (c.model_type, c.n_layer, c.head_dim, c.kv_heads) == (preset.model_type, n_layer, preset.head_dim, 1)
        assert c.n_head == preset.n_head // preset.kv_heads and c.rope_scaling == preset.rope_scaling
        assert (c.qkv_bias, c.tie_word_embeddings) == (preset.qkv_bias, preset.tie_word_embeddings)


@pytest.mark.parametrize("case", ["greedy", "sampling-eos-min-new"])
@pytest.mark.parametrize("name", list(LLAMA_LAYERS))
def test_llama_family_decode_step_launches_no_more_per_layer_than_gpt2(name, case, triton_backend, gpt2_per_layer):
    counts = count_decode_launches(structure_model(name), batch=2, **OPTIONS[case])
    assert counts["backend"] == "triton" and counts["layers"] == LLAMA_LAYERS[name]
    assert counts["host_syncs"] == 0, counts["host_sync_ops"]
    assert max(counts["per_layer"]) <= gpt2_per_layer, counts["ops_layer0"]
    assert counts["outside_layers"] <= 4, counts["ops_outside"]  # embedding, ln_f + LM head, the sampler
    assert counts["launches_per_token"] <= LLAMA_LAYERS[name] * gpt2_per_layer + 4


def test_llama_family_long_cache_splits_stay_within_gpt2s_per_layer(triton_backend, gpt2_per_layer, monkeypatch):
    """Several attention splits (a GPU's long cache): the combine still rides in the out-projection."""
    from fastgpt.kernels import attention_decode

    monkeypatch.setattr(attention_decode, "decode_num_splits", lambda *args, **kwargs: 4)
    counts = count_decode_launches(structure_model("llama-3.2-1b"), max_new_tokens=40, **OPTIONS["sampling-eos-min-new"])
    assert max(counts["per_layer"]) <= gpt2_per_layer, counts["ops_layer0"]


def test_llama_family_torch_backend_is_counted_too(monkeypatch):
    """The PyTorch oracle runs (and is counted) on the LLaMA family already; no host sync."""
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    counts = count_decode_launches(structure_model("llama-3.2-1b", dtype=torch.float32), batch=2)
    assert counts["backend"] == "torch" and counts["host_syncs"] == 0 and counts["layers"] == 16
    assert counts["launches_per_token"] > 16 * 5  # separate ops: why the Triton path exists
