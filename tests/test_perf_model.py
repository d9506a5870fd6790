"""The decode performance model (benchmarks/perf_model.py) and its fields in the benchmarks' JSON.

The arithmetic is checked against hand-computed numbers (GPT-2's parameter count from its
architecture, a step time worked out by hand), the committed prediction table against a fresh
one, and the decode benchmark's and the headline stage's rows against the model's formula with
the GPU-only inputs (launch overhead, launch counter) replaced by fixed values.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import decode, headline, perf_model
from benchmarks.common import REPO_ROOT
from fastgpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PREDICTIONS = REPO_ROOT / "benchmarks" / "results" / "perf_model_predictions.json"


def gpt2_parameters(vocab: int, positions: int, d: int, layers: int) -> int:
    """GPT-2's parameter count from its architecture: embeddings, per layer 2 LayerNorms,
    QKV (3d^2 + 3d), out-projection (d^2 + d), MLP (4d^2 + 4d, 4d^2 + d), the final LayerNorm."""
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_parameter_count_of_the_presets(name):
    c = GPTConfig.from_preset(name)
    expected = gpt2_parameters(c.vocab_size, c.n_positions, c.n_embd, c.n_layer)
    assert perf_model.n_parameters(c) == expected
    assert expected == {"gpt2": 124_439_808, "gpt2-xl": 1_557_611_200}[name]


def test_bytes_per_token_are_the_benchmarks_step_bytes_plus_the_kv_written():
    config = GPTConfig(vocab_size=100, n_positions=32, n_embd=16, n_head=2, n_layer=3)
    model = GPT.from_config(config)
    for batch, context in ((1, 10.0), (3, 7.5)):
        written = 2 * 3 * batch * 16 * 4  # one new K and V per layer and row, float32
        got = perf_model.bytes_per_token(config, batch, context, 4)
        assert got == pytest.approx(decode.step_bytes(model, batch, context) + written)


def test_bytes_per_token_of_gpt2_fp16():
    c = GPTConfig.from_preset("gpt2")
    weights = (124_439_808 - 1024 * 768 + 768) * 2
    kv = 2 * 12 * 768 * 2 * (256 + 1)  # 256 slots read, one written
    assert perf_model.bytes_per_token(c, 1, 256, 2) == weights + kv  # about 257 MB


def test_bytes_per_token_of_llama_3_2_1b_bf16():
    """Issue 15's target row: 2.47 GB of weights (tied head counted once, no position table), K and
    V of 8 heads of 64 per layer (GQA: a quarter of the 32 query heads')."""
    c = GPTConfig.from_preset("llama-3.2-1b")
    assert perf_model.n_parameters(c) == c.num_parameters() == 1_235_814_400
    assert perf_model.weight_bytes(c, 1, 2) == 1_235_814_400 * 2  # 2.47 GB
    assert perf_model.kv_slot_bytes(c, 1, 2) == 2 * 16 * 8 * 64 * 2
    assert perf_model.bytes_per_token(c, 1, 256, 2) == 1_235_814_400 * 2 + 2 * 16 * 8 * 64 * 2 * (256 + 1)
    # Untied (Llama-3.1-8B): the token embedding is only gathered, the LM head read whole.
    c8 = GPTConfig.from_preset("llama-3.1-8b")
    assert perf_model.weight_bytes(c8, 2, 2) == (c8.num_parameters() - 128256 * 4096 + 2 * 4096) * 2


def test_step_time_and_tokens_per_s_by_hand():
    # 1 GB at 0.8 x 1000 GB/s = 1.25 ms; 100 launches x 2 us = 0.2 ms.
    assert perf_model.predict_step_s(1e9, 100, 1000.0, 2.0) == pytest.approx(1.45e-3)
    assert perf_model.predict_tokens_per_s(1e9, 100, 1000.0, 2.0) == pytest.approx(1 / 1.45e-3)
    assert perf_model.predict_tokens_per_s(1e9, 100, 1000.0, 2.0, batch=4) == pytest.approx(4 / 1.45e-3)
    assert perf_model.predict_step_s(1e9, 0, 1000.0, 0.0, efficiency=1.0) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "args,match",
    [((1e9, 1, 0.0, 1.0), "bandwidth_gbs must be > 0"), ((1e9, 1, 10.0, 1.0, 1.5), "efficiency in \\(0, 1\\]"),
     ((1e9, -1, 10.0, 1.0), "launches and launch_overhead_us must be >= 0, got -1"),
     ((1e9, 1, 10.0, -2.0), "launches and launch_overhead_us must be >= 0, got 1, -2.0")],
)  # fmt: skip
def test_bad_model_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        perf_model.predict_step_s(*args)


def test_prediction_table_covers_the_closing_note_and_is_committed():
    table = perf_model.prediction_table()
    rows = table["rows"]
    assert len(rows) == 2 * 2 * 2 * 3 + 2 * 3  # GPT-2: models x devices x before/after x overheads; + llama
    for r in rows:  # roofline_frac: the predicted step's bandwidth over the copy bandwidth
        gbs = r["bytes_per_token"] * r["predicted_tokens_per_s"] / 1e9
        assert r["roofline_frac"] == pytest.approx(gbs / r["copy_bandwidth_gbs"]) and r["roofline_frac"] < 0.8
    index = {(r["model"], r["device"], r["launches_per_token"], r["launch_overhead_us"]): r for r in rows}
    # The estimate: gpt2 before the cuts, 2-4 us per launch, about 2,400-4,200 tok/s on an H200.
    assert 2_300 < index["gpt2", "H200", 87, 4.0]["predicted_tokens_per_s"] < index["gpt2", "H200", 87, 2.0][
        "predicted_tokens_per_s"] < 4_200  # fmt: skip
    # gpt2-xl's bandwidth floor: about 1,080 tok/s at 0.8 x 4.3 TB/s.
    assert index["gpt2-xl", "H200", 244, 1.0]["bandwidth_only_tokens_per_s"] == pytest.approx(1078, rel=2e-3)
    for model, (before, after) in (("gpt2", (87, 64)), ("gpt2-xl", (303, 244))):
        for device in ("H200", "H100"):
            for us in (1.0, 2.0, 4.0):
                b, a = index[model, device, before, us], index[model, device, after, us]
                assert a["predicted_tokens_per_s"] > b["predicted_tokens_per_s"]
                step = a["bytes_per_token"] / (0.8 * a["copy_bandwidth_gbs"] * 1e9) + after * us * 1e-6
                assert a["predicted_tokens_per_s"] == pytest.approx(1 / step)
    # Issue 15's row: Llama-3.2-1B bf16 at its launch budget (84); the target (75 % of the roofline,
    # about 1,300 tok/s on an H200) needs about 1 us per launch or less at 0.8 of the copy bandwidth.
    llama = index["llama-3.2-1b", "H200", 84, 1.0]
    assert llama["dtype"] == "bfloat16" and llama["launches"] == "budget"
    assert 1_200 < llama["predicted_tokens_per_s"] < 1_300 and 0.70 < llama["roofline_frac"] < 0.75
    assert index["llama-3.2-1b", "H200", 84, 4.0]["roofline_frac"] < 0.6
    committed = json.loads(PREDICTIONS.read_text())
    assert committed == json.loads(json.dumps(table)), "rerun: python -m benchmarks.perf_model --table --out " + str(PREDICTIONS)


def test_table_cli_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert perf_model.main(["--table", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gpt2-xl | H100 | 244 (after) |" in printed and "| gpt2 | H200 | 87 (before) |" in printed
    assert "| llama-3.2-1b | H200 | 84 (budget) | 1,242 (72%) |" in printed
    assert json.loads(out.read_text())["rows"][0]["model"] == "gpt2"
    with pytest.raises(SystemExit):
        perf_model.main([])


def test_launch_overhead_is_none_without_cuda():
    assert perf_model.measure_launch_overhead_us("cpu") is None


@pytest.fixture
def fake_counter(monkeypatch):
    """The launch counter replaced by one that returns 40 and records FASTGPT_PDL per call."""
    from benchmarks import launch_count

    seen = []

    def count_decode_launches(model, *, batch, run_kernels):
        seen.append(os.environ.get("FASTGPT_PDL"))
        return dict(launches_per_token=40)

    monkeypatch.setattr(launch_count, "count_decode_launches", count_decode_launches)
    return seen


def test_count_launches_counts_or_says_why(monkeypatch):
    from benchmarks import launch_count

    model = GPT.from_config(GPTConfig(vocab_size=50, n_positions=16, n_embd=8, n_head=2, n_layer=1))
    launches, why = perf_model.count_launches(model, 1)  # the real counter, torch backend
    assert why is None and launches == launch_count.count_decode_launches(model, batch=1)["launches_per_token"] > 0

    def broken(model, *, batch, run_kernels):
        raise RuntimeError("cannot count here")

    monkeypatch.setattr(launch_count, "count_decode_launches", broken)
    assert perf_model.count_launches(model, 1) == (None, "RuntimeError: cannot count here")


def test_decode_benchmark_rows_carry_the_prediction_and_the_pdl_off_row(monkeypatch, tmp_path, fake_counter, capsys):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(perf_model, "measure_launch_overhead_us", lambda device: 1.5)
    pdl_during_generate = []
    real_generate = GPT.generate

    def spied_generate(self, *args, **kwargs):
        pdl_during_generate.append(os.environ.get("FASTGPT_PDL"))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate", spied_generate)
    args = ["--device", "cpu", "--models", "tiny", "--batch", "2", "--prompt-len", "4", "--new-tokens", "3",
            "--repeats", "1", "--no-plots", "--pdl", "off"]  # fmt: skip
    decode.main(args)
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert data["launch_overhead_us"] == 1.5
    engines = {r["engine"]: r for r in data["rows"]}
    assert set(engines) == {"hf-eager", "hf-static", "fastgpt", "fastgpt-pdl-off"}
    for name in ("fastgpt", "fastgpt-pdl-off"):
        r = engines[name]
        n_bytes = perf_model.bytes_per_token(decode.SMALL_SHAPES["tiny"], 2, 4 + 3 / 2, 4)
        step = n_bytes / (0.8 * data["copy_bandwidth_gbs"] * 1e9) + 40 * 1.5e-6
        assert r["bytes_per_token"] == n_bytes and r["launches_per_token"] == 40 and r["launch_overhead_us"] == 1.5
        assert r["predicted_tokens_per_s"] == pytest.approx(2 / step) and r["greedy_match"] is True
        assert r["tokens_per_s"] > 0
    assert "predicted_tokens_per_s" not in engines["hf-eager"]
    printed = capsys.readouterr().out  # the table shows the model's step beside the measured one
    assert "launch in a graph 1.50 us" in printed and f"{engines['fastgpt']['predicted_ms_per_token']:.2f}" in printed
    assert fake_counter == [None, "0"]  # launches counted under each engine's PDL setting
    assert "0" in pdl_during_generate and None in pdl_during_generate
    assert os.environ.get("FASTGPT_PDL") is None  # restored


def test_headline_fastgpt_row_carries_the_prediction(monkeypatch, fake_counter):
    rows = []
    monkeypatch.setattr(headline, "record", lambda stage, kind, **row: rows.append(row))
    headline.measure_row("tiny", 1, 4, 3, torch.device("cpu"), torch.float32, 50.0, 2.0)
    fast = next(r for r in rows if r["engine"] == "fastgpt")
    assert fast["greedy_match"] is True and fast["launches_per_token"] == 40 and fast["launch_overhead_us"] == 2.0
    n_bytes = perf_model.bytes_per_token(decode.SMALL_SHAPES["tiny"], 1, 4 + 3 / 2, 4)
    assert fast["predicted_tokens_per_s"] == pytest.approx(1 / (n_bytes / (0.8 * 50e9) + 40 * 2e-6))
    assert "predicted_tokens_per_s" not in next(r for r in rows if r["engine"] == "hf-eager")
