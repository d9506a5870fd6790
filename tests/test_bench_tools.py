"""The decode benchmark's and the profiler's pure-Python parts, on the CPU.

The profiler runs end to end on a tiny model (its CPU configuration); the GPU-only pieces (the
kernel attribution of a graph replay, the roofline, the plots of a GPU run, the target summary)
are checked on synthetic data shaped like a GPU run's.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import decode, plots, profile, run_folder


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_profile_runs_on_a_tiny_model_and_writes_the_expected_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    result = profile.main(["--device", "cpu", "--dtype", "float32", "--prompt-len", "8"])
    data = json.loads((tmp_path / "profile_cpu.json").read_text())
    assert data == json.loads(json.dumps(result, default=str))
    for key in ("device", "date", "commit", "versions", "rows", "summary"):
        assert key in data
    (row,) = data["rows"]
    assert row["run"] == "fastgpt-torch" and row["path"] == "eager"
    for key in ("kernels_per_token", "time_us_per_token", "gpu_idle_frac", "by_part", "by_op", "top_kernels"):
        assert key in row
    assert set(row["by_part"]) == set(profile.PARTS)
    assert row["kernels_per_token"] > 10
    # Every part of the step is found through the op ranges: 2 layers, each with attention.
    for part in ("attention", "mlp", "layernorm", "lm_head", "sampling"):
        assert row["by_part"][part]["kernels"] > 0, (part, row["by_part"])
    assert row["by_op"]["attention"]["kernels"] >= 2
    assert data["summary"] and data["summary"][0]["metric"].startswith("profile tiny b1")
    # The ranges are gone after profiling: the hot path is untouched.
    import fastgpt.backend as backend

    assert not hasattr(backend.attention, "__wrapped__")


def test_align_ops_and_idle_share_on_a_synthetic_graph_trace():
    pairs = [("gemv", "qkv"), ("attn", "attention"), ("gemv", "attn_proj"), ("sample", "sample")]
    reference = [dict(name=n, op=o) for n, o in pairs]

    def kern(name, start, end):
        return dict(name=name, start=start, end=end, op=None)

    # Two replays; the graph adds a token copy at the end of each step.
    names = ["gemv", "attn", "gemv", "sample", "copy"] * 2
    kernels, t = [], 0.0
    for name in names:
        kernels.append(kern(name, t, t + 2.0))
        t += 2.5  # 0.5 us gap after every kernel
    profile.align_ops(kernels, reference)
    assert [k["op"] for k in kernels] == ["qkv", "attention", "attn_proj", "sample", None] * 2
    s = profile.summarise(kernels, n_steps=2, wall_us=12.5)
    assert s["kernels_per_token"] == 5
    assert s["time_us_per_token"] == pytest.approx(10.0)
    assert s["gpu_idle_frac"] == pytest.approx(0.2)
    assert s["gpu_idle_frac_trace"] == pytest.approx(1 - 20.0 / 24.5)
    assert s["by_part"]["attention"] == dict(us=6.0, kernels=3.0)
    assert s["by_part"]["sampling"] == dict(us=2.0, kernels=1.0)
    assert s["by_part"]["other"]["kernels"] == 1.0  # the copy, classified by name


def synthetic_gpu_result():
    rows = []
    for model, weights in (("gpt2", 250e6), ("gpt2-xl", 3.1e9)):
        for batch in (1, 8, 64):
            for engine, speed in (("hf-eager", 1.0), ("hf-static", 4.0), ("fastgpt", 60.0)):
                for prompt, new in ((128, 256), (16, 10)):
                    tps = 70 * speed * batch
                    rows.append(
                        dict(engine=engine, model=model, dtype="float16", batch=batch, prompt_len=prompt, new_tokens=new,
                             tokens_per_s=tps, tokens_per_s_min=0.9 * tps, tokens_per_s_max=1.05 * tps,
                             noisy=engine == "hf-eager", weights="random", backend="triton", ms_per_token=1e3 * batch / tps, step_bytes=weights + batch * 1e6,
                             roofline_frac=0.5 if engine == "fastgpt" else 0.01, greedy_match=engine != "hf-static",
                             match_prefix_min=7, divergence_near_tie=True,
                             speedup_vs_hf_eager=speed, speedup_vs_hf_static=speed / 4.0,
                             graph=dict(first_call=dict(path="graph", captured=True), warm=dict(path="graph")))
                    )  # fmt: skip
    rows.append(dict(engine="hf-static-compiled", model="gpt2", batch=1, prompt_len=128, new_tokens=256, error="RuntimeError: x"))
    return dict(device="NVIDIA H100", commit="abc", copy_bandwidth_gbs=3000.0, rows=rows)


def test_plots_of_a_gpu_shaped_result(tmp_path):
    pytest.importorskip("matplotlib")
    written = plots.plot_decode(synthetic_gpu_result(), tmp_path, prefix="decode")
    assert [p.name for p in written] == ["decode_engines.png", "decode_tokens_per_s.png", "decode_ms_per_token.png"]
    for p in written:
        assert p.stat().st_size > 10_000


def test_plots_draw_only_what_the_run_measured(tmp_path):
    """One batch size and one context: the batch and context plots would be two dots; not drawn."""
    pytest.importorskip("matplotlib")
    result = synthetic_gpu_result()
    result["rows"] = [r for r in result["rows"] if r.get("batch") == 1 and r.get("prompt_len") == 128]
    assert [p.name for p in plots.plot_decode(result, tmp_path, prefix="d")] == ["d_engines.png"]


def test_noisy_engines_are_those_whose_times_overlap():
    times = {"a": [1.0, 1.1, 1.2], "b": [1.15, 1.3, 1.4], "c": [2.0, 2.01, 2.02]}
    assert decode.noisy_engines(times) == {"a", "b"}
    assert decode.noisy_engines({"a": [1.0, 1.01], "b": [1.5, 1.6]}) == set()


def test_default_run_is_the_design_card_model_and_gpt2_at_batch_1_and_8(monkeypatch):
    args = decode.parse_args(["--device", "cpu"])
    assert args.repeats == 3 and args.engines == ["hf-eager", "hf-static", "fastgpt"]
    main = {(m, b) for m, b, p, n in args.configs if p == 16 and n == 32}
    assert main == {("small-d256", 1), ("small-d256", 8), ("gpt2", 1), ("gpt2", 8)}
    # Issue 15's CPU target: the small LLaMA- and Qwen-shaped models, batch 1, 64 new tokens.
    assert [c for c in args.configs if c[0] in decode.LLAMA_CPU_MODELS] == [("small-llama", 1, 16, 64),
                                                                           ("small-qwen", 1, 16, 64)]  # fmt: skip
    assert {p for m, b, p, n in args.configs if m == "small-d256" and b == 1} == {16, 128, 512}
    full = decode.parse_args(["--device", "cpu", "--full"])
    assert len(full.configs) > len(args.configs) and "gpt2-medium" in {c[0] for c in full.configs}
    picked = decode.parse_args(["--device", "cpu", "--models", "tiny", "--batch", "2"])
    assert {(m, b) for m, b, _, _ in picked.configs} == {("tiny", 2)}


def test_gpu_runs_have_the_llama_family_rows_in_bf16():
    args = decode.parse_args(["--device", "cuda"])
    llama = {(m, b, p, n) for m, b, p, n in args.configs if m in decode.LLAMA_GPU_MODELS}
    assert llama == {(m, b, 128, 256) for m in ("llama-3.2-1b", "qwen2.5-0.5b") for b in (1, 16)}
    assert {c[0] for c in args.configs} >= {"small-d256", "gpt2"}  # the GPT-2 rows stay
    quick = decode.parse_args(["--device", "cuda", "--quick"])
    assert ("llama-3.2-1b", 1, 128, 256) in quick.configs and ("gpt2", 1, 128, 256) in quick.configs
    full = decode.parse_args(["--device", "cuda", "--full"])
    assert {(m, b) for m, b, _, _ in full.configs if m in decode.LLAMA_GPU_MODELS} == {
        (m, b) for m in decode.LLAMA_GPU_MODELS for b in (1, 16, 64)}  # fmt: skip
    assert args.dtype is None  # per model:
    assert decode.model_dtype("llama-3.2-1b", "cuda") == decode.model_dtype("qwen2.5-0.5b", "cuda") == "bfloat16"
    assert decode.model_dtype("gpt2", "cuda") == "float16" and decode.model_dtype("small-llama", "cpu") == "float32"
    assert decode.model_dtype("llama-3.2-1b", "cuda", "float16") == "float16"  # --dtype wins


def test_small_llama_family_shapes_keep_their_presets_grouping():
    from fastgpt import GPTConfig

    for small, preset in (("small-llama", "llama-3.2-1b"), ("small-qwen", "qwen2.5-0.5b")):
        s, p = decode.SMALL_SHAPES[small], GPTConfig.from_preset(preset)
        assert (s.model_type, s.vocab_size, s.head_dim, s.n_head // s.kv_heads) == (
            p.model_type, p.vocab_size, p.head_dim, p.n_head // p.kv_heads)  # fmt: skip
        assert (s.rope_theta, s.rope_scaling, s.qkv_bias, s.tie_word_embeddings) == (
            p.rope_theta, p.rope_scaling, p.qkv_bias, p.tie_word_embeddings)  # fmt: skip
        assert s.n_layer == 4 and s.n_embd < p.n_embd


def test_results_never_overwrite_the_reference_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("RESULTS_DIR", raising=False)
    run = run_folder.output_dir(reference=False)
    assert run.parent == run_folder.REFERENCE_DIR / "runs"
    run.rmdir()
    # The Makefile's default RESULTS_DIR is the reference folder itself: still a run folder.
    monkeypatch.setenv("RESULTS_DIR", str(run_folder.REFERENCE_DIR))
    run = run_folder.output_dir(reference=False)
    assert run.parent == run_folder.REFERENCE_DIR / "runs"
    run.rmdir()
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    assert run_folder.output_dir(reference=False) == tmp_path
    assert run_folder.output_dir(reference=True) == run_folder.REFERENCE_DIR
    assert run_folder.device_tag("cpu (x86_64, 2 cores)") == "cpu"
    assert run_folder.device_tag("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


def test_decode_benchmark_end_to_end_on_a_tiny_model(monkeypatch, tmp_path):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    args = ["--device", "cpu", "--models", "tiny", "--batch", "1", "2", "--prompt-len", "4", "--new-tokens", "3",
            "--repeats", "2", "--no-plots"]  # fmt: skip
    result = decode.main(args)
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert data["repeats"] == 2 and data["copy_bandwidth_gbs"] > 0
    assert {(r["engine"], r["batch"]) for r in data["rows"]} == {
        (e, b) for e in ("hf-eager", "hf-static", "fastgpt") for b in (1, 2)
    }
    for r in data["rows"]:
        assert len(r["times_s"]) == 2 and r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["greedy_match"] is True and isinstance(r["noisy"], bool) and r["roofline_frac"] > 0
        assert r["speedup_vs_hf_eager"] > 0 and r["spread_pct"] >= 0
    fast = [r for r in data["rows"] if r["engine"] == "fastgpt"]
    assert all(r["backend"] == "torch" for r in fast)
    assert result["rows"][0]["engine"] == "hf-eager"


def test_decode_benchmark_runs_a_llama_family_model_against_hf(monkeypatch, tmp_path):
    """HF's LlamaForCausalLM from ``config.to_hf()`` and fastgpt's copy of it: same tokens."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    hf, model, source = decode.build_models("tiny-llama", torch.float32, torch.device("cpu"))
    assert isinstance(hf, LlamaForCausalLM) and source == "random" and model.config == decode.SMALL_SHAPES["tiny-llama"]
    args = ["--device", "cpu", "--models", "tiny-llama", "--batch", "2", "--prompt-len", "4", "--new-tokens", "3",
            "--repeats", "1", "--no-plots"]  # fmt: skip
    decode.main(args)
    rows = json.loads((tmp_path / "decode_cpu.json").read_text())["rows"]
    assert {r["engine"] for r in rows} == {"hf-eager", "hf-static", "fastgpt"}
    for r in rows:
        assert r["greedy_match"] is True and r["dtype"] == "float32" and r["model"] == "tiny-llama"
        assert r["step_bytes"] == pytest.approx(decode.step_bytes(model, 2, 4 + 3 / 2))


def test_target_summary_reads_the_target_rows():
    result = synthetic_gpu_result()
    summary = {s["metric"]: s for s in decode.target_summary(result["rows"])}
    b1 = summary["decode gpt2 b1 tokens/s"]
    assert b1["value"] == pytest.approx(70 * 60) and b1["met"] is False  # 4200 < 5000
    assert summary["decode gpt2 b1 roofline"]["met"] is True
    assert summary["decode gpt2 b1 speed-up vs hf_eager"]["met"] is False  # 60 < 70
    assert summary["decode gpt2 b1 speed-up vs hf_static"]["met"] is True  # 15
    assert summary["decode gpt2-xl b1 roofline"]["met"] is False  # 0.5 < 0.8
    assert summary["decode gpt2 b64 speed-up vs hf_eager"]["met"] is True
    assert summary["decode gpt2 b1 greedy vs HF eager"]["value"] == "identical"
    for s in summary.values():
        assert set(s) == {"metric", "value", "target", "met"}


def test_target_summary_reads_the_llama_family_targets():
    base = dict(engine="fastgpt", batch=1, greedy_match=True)
    rows = [
        dict(base, model="llama-3.2-1b", prompt_len=128, new_tokens=256, tokens_per_s=1350.0, roofline_frac=0.78,
             launches_per_token=84, speedup_vs_hf_eager=30.0, match_prefix_min=256),
        dict(base, model="small-llama", prompt_len=16, new_tokens=64, tokens_per_s=20.0, speedup_vs_hf_eager=1.3,
             match_prefix_min=64),
        dict(base, model="small-qwen", prompt_len=16, new_tokens=64, tokens_per_s=20.0, speedup_vs_hf_eager=0.9,
             greedy_match=False, match_prefix_min=10, divergence_gap=0.5, divergence_near_tie=False),
    ]  # fmt: skip
    summary = {s["metric"]: s for s in decode.target_summary(rows)}
    assert summary["decode llama-3.2-1b b1 roofline"]["met"] is True  # 0.78 >= 0.75
    assert summary["decode llama-3.2-1b b1 launches/token"]["met"] is True
    assert summary["decode llama-3.2-1b b1 greedy vs HF eager"]["value"] == "identical"
    assert summary["decode small-llama b1 speed-up vs hf_eager"]["met"] is True
    assert summary["decode small-qwen b1 speed-up vs hf_eager"]["met"] is False  # slower than HF eager
    assert summary["decode small-qwen b1 greedy vs HF eager"]["met"] is False
    rows[0]["roofline_frac"] = 0.6
    assert {s["metric"]: s for s in decode.target_summary(rows)}["decode llama-3.2-1b b1 roofline"]["met"] is False


def test_compare_greedy_reports_the_first_divergence():
    from tests.models import pair

    _, model = pair("tiny-503")
    ids = torch.randint(0, 503, (2, 4))
    ref = model.generate(ids, 8)
    assert decode.compare_greedy(ref.clone(), ref, 4, model) == dict(greedy_match=True, match_prefix_min=8)
    out = ref.clone()
    out[1, 4 + 5] = (out[1, 4 + 5] + 1) % 503
    result = decode.compare_greedy(out, ref, 4, model)
    assert result["greedy_match"] is False and result["match_prefix_min"] == 5
    assert result["divergence_gap"] > 0 and isinstance(result["divergence_near_tie"], bool)


def test_step_bytes_of_the_llama_family_no_position_table_and_grouped_kv():
    from fastgpt import GPT, GPTConfig

    for tied in (True, False):
        config = GPTConfig(model_type="llama", activation="silu", vocab_size=100, n_positions=32, n_embd=16, n_head=4,
                           n_kv_head=2, head_size=8, n_layer=3, n_inner=24, tie_word_embeddings=tied, qkv_bias=False,
                           out_bias=False, mlp_bias=False)  # fmt: skip
        model = GPT.from_config(config)
        assert model.wpe is None
        params = sum(p.numel() for p in model.parameters())
        # Per layer: 2 norms, Q/K/V (16 x (32 + 2 * 16)), out (32 x 16), gate + up + down (3 x 16 x 24).
        per_layer = 2 * 16 + 16 * 64 + 32 * 16 + 3 * 16 * 24
        assert params == 100 * 16 * (1 if tied else 2) + 3 * per_layer + 16
        # Untied: the token embedding is only gathered (2 rows), the LM head read whole.
        weights = (params - (0 if tied else 100 * 16 - 2 * 16)) * 4
        kv = 2 * 3 * 2 * 10.0 * (2 * 8) * 4  # K and V, 3 layers, batch 2, 10 slots, 2 K/V heads of 8
        assert decode.step_bytes(model, batch=2, context=10.0) == pytest.approx(weights + kv)


def test_step_bytes_counts_weights_once_and_the_live_kv():
    from fastgpt import GPT, GPTConfig

    model = GPT.from_config(GPTConfig(vocab_size=100, n_positions=32, n_embd=16, n_head=2, n_layer=3))
    weights = sum(p.numel() for p in model.parameters()) * 4
    expected = weights - 32 * 16 * 4 + 2 * 16 * 4 + 2 * 3 * 2 * 10.0 * 16 * 4
    assert decode.step_bytes(model, batch=2, context=10.0) == pytest.approx(expected)


def test_markdown_table_has_one_line_per_row_and_marks_noise():
    from benchmarks.decode_report import COLUMNS, markdown_table

    result = synthetic_gpu_result()
    lines = markdown_table(result).splitlines()
    assert len(lines) == 2 + len(result["rows"])
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines)
    assert "| hf-eager | gpt2 | 1 | 128 | 256 | ~70.0 |" in lines[2]
    assert "error: RuntimeError: x" in lines[-1]
