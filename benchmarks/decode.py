"""Decode benchmark: fastgpt against Hugging Face ``generate`` on GPT-2- and LLaMA-family models.

``python -m benchmarks.decode`` (``make bench``): on a 2-core CPU it finishes in about 3-4 minutes
on a quiet machine (under 5 on a busy one). Every engine runs on the same weights (random unless
real GPT-2 weights are on disk: speed does not depend on the values) in one run, and every
engine's greedy tokens are compared with HF eager's, so no speed is reported for a wrong answer.

Models: GPT-2 presets and shapes (``GPT2LMHeadModel``), and the LLaMA family (issue 15): the
``llama-3.2-1b`` and ``qwen2.5-0.5b`` presets on a GPU, and on a CPU their small versions
(``small-llama``: Llama-3.2-1B's vocabulary, rope and grouping -- 4 query heads per K/V head,
head_dim 64 -- at width 512 and 4 layers; ``small-qwen``: Qwen2.5-0.5B's vocabulary, Q/K/V biases
and grouping -- 7 per K/V head -- at width 448 and 4 layers). A LLaMA-family HF model is
``AutoModelForCausalLM.from_config(config.to_hf())`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``)
with random weights, and fastgpt's is ``GPT.from_hf`` of it: both run identical weights.
dtype (unless ``--dtype``): on a GPU float16 for GPT-2 and bfloat16 for the LLaMA family (the
released checkpoints' dtype, issue 15's target); float32 on a CPU.

What runs
---------
Engines: ``hf-eager`` (HF ``generate``, dynamic cache), ``hf-static`` (``cache_implementation=
"static"``, ``disable_compile=True``), ``hf-static-compiled`` (the same, HF compiling the forward),
``fastgpt-torch`` (the PyTorch reference ops), ``fastgpt-eager`` (the Triton kernels, eager step),
``fastgpt`` (the default path: Triton kernels + the CUDA-graph decode step on a GPU; on a CPU the
PyTorch reference ops).

* default: the design-card model (``small-d256``: GPT-2's 50257 vocabulary, 4 layers of width
  256) and the GPT-2 small shape (``gpt2``), batch 1 and 8, a 16-token prompt, 32 new tokens
  (128 on a GPU), engines ``hf-eager``, ``hf-static``, ``fastgpt``; the LLaMA family: on a CPU
  ``small-llama`` and ``small-qwen`` at batch 1, 16-token prompt, 64 new tokens (issue 15's CPU
  target: not slower than HF eager), on a GPU ``llama-3.2-1b`` and ``qwen2.5-0.5b`` at batch 1
  and 16, 128-token prompt, 256 new tokens; plus ``small-d256`` at batch 1 with 128- and
  512-token prompts, for the ms-per-token-against-context plot.
* ``--full``: the whole matrix (GPU: gpt2, gpt2-medium, gpt2-xl; batch 1, 8, 64; prompt 16, 512;
  new tokens 10 .. 512; llama-3.2-1b, qwen2.5-0.5b: batch 1, 16, 64; prompt 16, 512; 128 and 256
  new tokens; every engine. CPU: small-d256, gpt2, gpt2-medium; batch 1, 8; prompt 16, 256; 32
  and 128 new tokens; small-llama, small-qwen: batch 1, 8; 64 new tokens). ``--quick``: the
  issues' target rows (GPU: gpt2 b1 and b64, gpt2-xl b1, llama-3.2-1b b1).
  Subsets via ``--models/--batch/--prompt-len/--new-tokens/--engines``.

How it is timed
---------------
For each configuration every engine makes one cold call (``first_call_s``; on a GPU it includes
the CUDA-graph capture) and one warm-up of the 1-token call; then ``--repeats`` rounds (default
3), each timing every engine once -- an n-token call and a 1-token call -- with the engines in a
rotated order each round, so that a slow phase of a busy machine falls on all engines alike.

Per row (JSON field: meaning)
-----------------------------
* ``tokens_per_s``: all rows' new tokens over the median warm ``generate`` call (prefill
  included); ``tokens_per_s_min`` / ``_max``: over the slowest / fastest call.
* ``spread_pct``: ``100 * (max - min) / median`` of the warm call times.
* ``noisy``: this engine's [min, max] call times overlap another engine's in the same
  configuration, so this run does not establish their order (the table marks it ``~``).
  With ``--repeats 1`` (``--quick``) there is no spread: ``spread_pct`` and ``noisy`` are None.
* ``ms_per_token``: one decode step, the median over rounds of ``(t(n) - t(1)) / (n - 1)`` from
  the round's n-token and 1-token calls (prefill cancels out), ``ms_per_token_min`` / ``_max``
  over the rounds; ``ms_per_token_e2e`` = ``t(n) / n``.
* ``step_bytes``: what one decode step must read -- every weight once (of a table that is only
  gathered, the ``B`` rows used: GPT-2's position table, an untied token embedding; the LLaMA
  family has no position table) plus the live K and V of every layer at the mean context
  ``prompt_len + new_tokens / 2``, ``n_kv_head * head_dim`` values each
  (``benchmarks.perf_model.weight_bytes`` and ``kv_slot_bytes``); ``step_gbs`` = step_bytes /
  step time; ``roofline_frac`` = step_gbs / ``copy_bandwidth_gbs``, the copy bandwidth (bytes
  read + written per second of a large ``dst.copy_(src)``) measured in the same run on the same
  device (GPU: median of 20 1 GiB copies at the start; CPU: the fastest of 10 256 MiB copies at
  the start and at the end).
* ``speedup_vs_hf_eager`` / ``speedup_vs_hf_static``: that engine's median call time over this
  engine's, same configuration, same run.
* ``greedy_match``: tokens identical to HF eager's; ``match_prefix_min``: new tokens equal before
  the first divergence (over rows); on a divergence ``divergence_gap`` is the difference of the
  two competing tokens' logits at that position (fastgpt forward, model dtype) relative to the
  largest logit, and ``divergence_near_tie`` says whether it is below ``NEAR_TIE``.
* ``backend``: the fastgpt backend that ran (``kernels``: which implementation each op used);
  ``graph``: whether the warm call replayed a CUDA graph; ``weights``: random or their file.
* GPU only: ``peak_mem_mb`` = the engine's weights + the peak of everything else allocated
  during its warm calls; ``weights_mb``, ``kv_cache_mb``, ``workspace_mb`` = the rest.
* fastgpt rows: the performance model's (``benchmarks/perf_model.py``) ``bytes_per_token``,
  ``launches_per_token`` (None without a launch counter), ``launch_overhead_us`` (per kernel in a
  CUDA graph, measured at the start of the run; None on a CPU), ``predicted_tokens_per_s`` and
  ``predicted_ms_per_token`` (None unless all were measured): a step far slower than predicted
  loses time elsewhere. ``--pdl off`` adds the engine ``fastgpt-pdl-off`` (``FASTGPT_PDL=0``).

Where results go
----------------
``decode_<device>.json`` and its plots go where ``benchmarks/run_folder.py`` says: a new
git-ignored run folder ``benchmarks/results/runs/<UTC time>/`` (or ``$RESULTS_DIR`` when it
names a folder of your own); ``--reference`` writes the committed reference results
``benchmarks/results/decode_<device>.*`` (``cpu``, ``h100``, ...), on purpose only.
The JSON is rewritten after every configuration: an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks import perf_model
from benchmarks.common import env_override, measure_copy_bandwidth_gbs, result_header
from benchmarks.decode_report import print_table, target_summary
from benchmarks.run_folder import output_dir, write_json
from fastgpt import GPTConfig
from fastgpt.kv_cache import bucket_length

PDL_OFF_ENGINE = "fastgpt-pdl-off"  # the default path with programmatic dependent launch off
ENGINES = ("hf-eager", "hf-static", "hf-static-compiled", "fastgpt-torch", "fastgpt-eager", "fastgpt", PDL_OFF_ENGINE)
FASTGPT_ENV = {  # engine -> (FASTGPT_BACKEND, FASTGPT_CUDA_GRAPH); None: unset (auto)
    "fastgpt-torch": ("torch", "0"),
    "fastgpt-eager": (None, "0"),
    "fastgpt": (None, None),
    PDL_OFF_ENGINE: (None, None),
}
#: Relative logit gap under which a greedy divergence counts as a near-tie (fp16 rounding).
NEAR_TIE = 1e-2
#: Shapes that are not GPT-2 presets: the design card's model, and a tiny one for the tests.
#: The LLaMA family's small shapes keep their preset's vocabulary, rope, biases and grouping
#: (query heads per K/V head) at head_dim 64, with a small width and 4 layers (CPU rows).
SMALL_SHAPES = {
    "small-d256": GPTConfig(n_embd=256, n_head=8, n_layer=4),
    "tiny": GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_head=2, n_layer=2),
    "small-llama": GPTConfig.from_preset("llama-3.2-1b", n_positions=2048, n_embd=512, n_head=8, n_kv_head=2,
                                         n_layer=4, n_inner=2048),
    "small-qwen": GPTConfig.from_preset("qwen2.5-0.5b", n_positions=2048, n_embd=448, n_head=7, n_kv_head=1,
                                        n_layer=4, n_inner=2432),
    # The tests' and the dry run's: Llama-3.2-1B's grouping (4) and rope at a tiny width and vocabulary.
    "tiny-llama": GPTConfig.from_preset("llama-3.2-1b", vocab_size=1000, n_positions=128, n_embd=256, n_head=4,
                                        n_kv_head=1, n_layer=2, n_inner=512),
}  # fmt: skip
#: The LLaMA family's rows (issue 15): the released shapes on a GPU, their small versions on a CPU.
LLAMA_GPU_MODELS = ("llama-3.2-1b", "qwen2.5-0.5b")
LLAMA_CPU_MODELS = ("small-llama", "small-qwen")
TARGET_CONFIGS = [("gpt2", 1, 128, 256), ("gpt2", 64, 128, 256), ("gpt2-xl", 1, 128, 256),
                  ("llama-3.2-1b", 1, 128, 256)]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models and engines
# --------------------------------------------------------------------------------------------
def model_config(name: str) -> GPTConfig:
    """The shape of a benchmark model name: :data:`SMALL_SHAPES` or a ``GPTConfig`` preset."""
    return SMALL_SHAPES[name] if name in SMALL_SHAPES else GPTConfig.from_preset(name)


def model_dtype(name: str, device: torch.device | str, dtype: str | None = None) -> str:
    """The dtype a model runs in: ``dtype`` when given (``--dtype``), else float32 on a CPU and on
    a GPU float16 (GPT-2) or bfloat16 (the LLaMA family)."""
    if dtype is not None:
        return dtype
    if torch.device(device).type != "cuda":
        return "float32"
    return "bfloat16" if model_config(name).is_llama else "float16"


def build_models(name: str, dtype: torch.dtype, device: torch.device):
    """(hf_model, fastgpt_model, source) with shared weight values; ``source`` is "random" or
    the checkpoint directory. LLaMA family: HF's model from ``config.to_hf()`` (random weights,
    no EOS: ``min_new_tokens`` would otherwise ban a token fastgpt may pick), fastgpt's from it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fastgpt import GPT
    from fastgpt.loading import find_checkpoint

    hf_logging.set_verbosity_error()
    cfg = model_config(name)
    if cfg.is_llama:
        from transformers import AutoModelForCausalLM

        hf_cfg = cfg.to_hf()
        hf_cfg.update(dict(pad_token_id=0, bos_token_id=None, eos_token_id=None))
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_cfg).to(dtype).eval()
        hf.generation_config.update(pad_token_id=0, bos_token_id=None, eos_token_id=None)
        return hf, GPT.from_hf(hf), "random"
    if name not in SMALL_SHAPES:
        try:
            path = find_checkpoint(name)
        except FileNotFoundError:
            path = None
        if path is not None:
            hf = GPT2LMHeadModel.from_pretrained(path, dtype=dtype).to(device).eval()
            return hf, GPT.from_hf(hf), f"real ({path})"
    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(GPT2Config(**{**cfg.to_hf().to_dict(), "pad_token_id": 0})).to(dtype).eval()
    return hf, GPT.from_hf(hf), "random"


def engine_env(engine: str, n_new: int = 2) -> dict[str, str | None]:
    """The environment a fastgpt engine runs under (for :func:`benchmarks.common.env_override`).

    A 1-token run (prefill only, for the step time) never uses a CUDA graph: it has no decode
    step, and capturing one for its shape would only cost time and memory.
    """
    backend, graph = FASTGPT_ENV[engine]
    env = dict(FASTGPT_BACKEND=backend, FASTGPT_CUDA_GRAPH="0" if n_new == 1 else graph)
    if engine == PDL_OFF_ENGINE:
        env["FASTGPT_PDL"] = "0"
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_runner(engine: str, hf, model, ids: torch.Tensor, n_new: int):
    """A zero-argument callable running one greedy generation of exactly ``n_new`` tokens."""
    if engine.startswith("hf"):
        kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        if engine != "hf-eager":
            kwargs["cache_implementation"] = "static"
            # On CUDA, HF compiles the static-cache forward by itself unless told not to.
            kwargs["disable_compile"] = engine == "hf-static"
        mask = torch.ones_like(ids)
        return lambda: hf.generate(ids, attention_mask=mask, **kwargs)
    env = engine_env(engine, n_new)

    def run():
        with env_override(**env):
            return model.generate(ids, n_new)

    return run


def _reset_engine_state(hf) -> None:
    """Free what an earlier configuration left behind (graphs, HF's static-cache length)."""
    from fastgpt import clear_graph_cache

    clear_graph_cache()
    # HF sizes every later static cache to the longest seen so far: start each config afresh.
    hf.__dict__.pop("_previous_max_cache_length", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(run, device) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    _sync(device)
    return time.perf_counter() - start, out


def _fastgpt_record() -> tuple[dict, dict]:
    """(which implementation each op used, what the last generate call did) for the last call."""
    import fastgpt

    report = fastgpt.run_report()
    return dict(report["dispatch"]), dict(report["generate"])


def _graph_summary(stats: dict | None) -> dict | None:
    if not stats:
        return None
    return {k: stats.get(k) for k in ("path", "captured", "capture_s", "reason", "decode_steps")}


def measure_config(engines, hf, model, ids, n_new, device, repeats) -> dict[str, dict]:
    """Every engine on one configuration: a cold call, then ``repeats`` rounds of one warm n-token
    and one warm 1-token call per engine, the engines' order rotated each round.

    Returns ``{engine: measurements}`` (an ``error`` entry for an engine that cannot run here).
    """
    from fastgpt import reset_kernels_report

    on_gpu = device.type == "cuda"
    base = torch.cuda.memory_allocated() if on_gpu else 0
    runs, m = {}, {}
    for engine in engines:
        try:
            run, run_one = make_runner(engine, hf, model, ids, n_new), make_runner(engine, hf, model, ids, 1)
            reset_kernels_report()
            cold, out = _timed(run, device)
            first = _fastgpt_record() if engine.startswith("fastgpt") else (None, None)
            _timed(run_one, device)  # warm the 1-token shape too (its own prefill plan)
        except Exception as exc:  # an engine that cannot run here (compile, OOM) is reported, not fatal
            m[engine] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        runs[engine] = (run, run_one)
        m[engine] = dict(cold_s=cold, out=out, kernels=first[0], first=first[1], times=[], steps=[], peak=0)
    live = list(runs)
    for round_ in range(repeats):
        shift = round_ % max(len(live), 1)
        for engine in live[shift:] + live[:shift]:
            run, run_one = runs[engine]
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            seconds, m[engine]["out"] = _timed(run, device)
            if on_gpu:
                m[engine]["peak"] = max(m[engine]["peak"], torch.cuda.max_memory_allocated() - base)
            if engine.startswith("fastgpt"):
                m[engine]["warm"] = _fastgpt_record()[1]  # of the n-token call (1-token has no decode step)
            one = _timed(run_one, device)[0]
            m[engine]["times"].append(seconds)
            m[engine]["steps"].append((seconds - one) / (n_new - 1) if n_new > 1 else seconds)
    return m


def measure_engine(engine: str, hf, model, ids, n_new: int, device, repeats: int = 1) -> dict:
    """One engine alone (the headline stage): :func:`measure_config`'s measurements reduced to
    ``out``, ``total_s`` (median call), ``step_s`` (median decode step), ``cold_s``, ``graph``.
    Raises ``RuntimeError`` when the engine cannot run here."""
    m = measure_config([engine], hf, model, ids, n_new, device, repeats)[engine]
    if "error" in m:
        raise RuntimeError(m["error"])
    graph = None
    if engine.startswith("fastgpt"):
        graph = dict(first_call=_graph_summary(m["first"]), warm=_graph_summary(m.get("warm")))
    return dict(out=m["out"], total_s=statistics.median(m["times"]), step_s=max(statistics.median(m["steps"]), 1e-9),
                cold_s=m["cold_s"], graph=graph)  # fmt: skip


def add_predictions(rows: list[dict], model, batch: int, context: float, copy_bw, launch_us) -> None:
    """The performance model's fields (:func:`benchmarks.perf_model.prediction_fields`) on every
    fastgpt row of one configuration, the launches counted under each engine's environment."""
    for row in rows:
        if row["engine"].startswith("fastgpt") and "error" not in row:
            with env_override(**engine_env(row["engine"])):
                launches, why = perf_model.count_launches(model, batch)
            row.update(perf_model.prediction_fields(model, batch, context, copy_bw, launch_us, launches))
            if why is not None:
                row["launches_note"] = why


def noisy_engines(times: dict[str, list[float]]) -> set[str]:
    """Engines whose [min, max] call times overlap another engine's: their order is not settled."""
    noisy = set()
    for a, ta in times.items():
        for b, tb in times.items():
            if a != b and min(ta) <= max(tb) and min(tb) <= max(ta):
                noisy.add(a)
    return noisy


def measure_cpu_copy_bandwidth_gbs(n_bytes: int = 1 << 28) -> float:
    """CPU memory copy bandwidth in GB/s (bytes read + written): the fastest of 10 copies of
    256 MiB, since on a shared machine other jobs only ever slow a copy down."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times) / 1e9


# --------------------------------------------------------------------------------------------
# Bytes, comparison
# --------------------------------------------------------------------------------------------
def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (of a gathered table -- GPT-2's position
    table, an untied token embedding -- only the ``B`` rows used) + the live K and V of every
    layer (``n_kv_head * head_dim`` values each): ``benchmarks.perf_model``'s formulas on the
    model's own parameters."""
    c, item = model.config, model.dtype.itemsize
    n_params = sum(p.numel() for p in model.parameters())
    return perf_model.weight_bytes(c, batch, item, n_params) + perf_model.kv_slot_bytes(c, batch, item) * context


def compare_greedy(out: torch.Tensor, ref: torch.Tensor, prompt_len: int, model) -> dict:
    """Identical, or where the first divergence is and whether it is a near-tie."""
    n = min(out.shape[1], ref.shape[1])
    same_rows = (out[:, :n] == ref[:, :n]).all(dim=1) & (out.shape[1] == ref.shape[1])
    if bool(same_rows.all()):
        return dict(greedy_match=True, match_prefix_min=n - prompt_len)
    diff = out[:, :n] != ref[:, :n]
    first = torch.where(diff.any(dim=1), diff.int().argmax(dim=1), n)  # (B,)
    row = int(first.argmin())
    pos = int(first[row])
    result = dict(greedy_match=False, match_prefix_min=pos - prompt_len)
    if pos < n:
        with torch.inference_mode():
            logits = model(ref[row : row + 1, :pos])[0, -1].float()
        a, b = int(ref[row, pos]), int(out[row, pos])
        gap = float((logits[a] - logits[b]).abs() / logits.abs().max().clamp(min=1.0))
        result.update(divergence_gap=gap, divergence_near_tie=gap <= NEAR_TIE)
    return result


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------
def _backend_of(kernels: dict | None) -> str | None:
    if not kernels:
        return None
    impls = set(kernels.values())
    return "triton" if any(str(i).startswith(("triton", "cublas")) for i in impls) else "torch"


def config_rows(name, source, dtype, batch, prompt_len, n_new, model, hf, m, nbytes, copy_bw) -> list[dict]:
    """The result rows of one configuration from :func:`measure_config`'s measurements."""
    c, item = model.config, model.dtype.itemsize
    w_mb = weights_bytes(model) / 2**20
    kv_mb = perf_model.kv_slot_bytes(c, batch, item) * (prompt_len + n_new) / 2**20
    fastgpt_kv_mb = kv_mb * bucket_length(prompt_len + n_new, c.n_positions) / (prompt_len + n_new)  # its cache: a bucket
    ok = {e: r for e, r in m.items() if "error" not in r}
    noisy = noisy_engines({e: r["times"] for e, r in ok.items()})
    medians = {e: statistics.median(r["times"]) for e, r in ok.items()}
    rows = []
    for engine, r in m.items():
        row = dict(engine=engine, model=name, weights=source, dtype=dtype, batch=batch, prompt_len=prompt_len,
                   new_tokens=n_new)  # fmt: skip
        if "error" in r:
            rows.append(dict(row, error=r["error"]))
            continue
        total, step = medians[engine], statistics.median(r["steps"])
        step = max(step, 1e-9)
        gbs = nbytes / step / 1e9
        row.update(
            tokens_per_s=batch * n_new / total,
            tokens_per_s_min=batch * n_new / max(r["times"]),
            tokens_per_s_max=batch * n_new / min(r["times"]),
            spread_pct=100 * (max(r["times"]) - min(r["times"])) / total if len(r["times"]) > 1 else None,
            noisy=engine in noisy if len(r["times"]) > 1 else None,  # one call: no spread, no noise check
            repeats=len(r["times"]),
            times_s=r["times"],
            ms_per_token=step * 1e3,
            ms_per_token_min=max(min(r["steps"]), 1e-9) * 1e3,
            ms_per_token_max=max(max(r["steps"]), 1e-9) * 1e3,
            ms_per_token_e2e=total / n_new * 1e3,
            first_call_s=r["cold_s"],
            step_bytes=nbytes,
            step_gbs=gbs,
            roofline_frac=(gbs / copy_bw) if copy_bw else None,
            backend=_backend_of(r["kernels"]),
            kernels=r["kernels"],
        )
        if engine.startswith("fastgpt"):
            row.update(graph=dict(first_call=_graph_summary(r["first"]), warm=_graph_summary(r.get("warm"))),
                       capture_s=(r["first"] or {}).get("capture_s") or 0.0)  # fmt: skip
        if r["peak"]:
            own_weights = w_mb if engine.startswith("fastgpt") else weights_bytes(hf) / 2**20
            own_kv = fastgpt_kv_mb if engine.startswith("fastgpt") else kv_mb
            peak = own_weights + r["peak"] / 2**20
            row.update(peak_mem_mb=peak, weights_mb=own_weights, kv_cache_mb=own_kv, workspace_mb=peak - own_weights - own_kv)
        for base in ("hf-eager", "hf-static"):
            if base in medians:
                row[f"speedup_vs_{base.replace('-', '_')}"] = medians[base] / total
        if "hf-eager" in ok:
            row.update(compare_greedy(r["out"], ok["hf-eager"]["out"], prompt_len, model))
        rows.append(row)
    return rows


def run_suite(args, save=None) -> dict:
    """Run every configuration of ``args``; ``save(result)`` is called after each one with the
    result so far (an interrupted run keeps what it measured)."""
    from tqdm import tqdm

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    copy_bw = measure_copy_bandwidth_gbs(device) if on_gpu else measure_cpu_copy_bandwidth_gbs()
    launch_us = perf_model.measure_launch_overhead_us(device)
    if not on_gpu:
        print("No GPU: CPU numbers; fastgpt runs its PyTorch backend here (the Triton kernels need a GPU).")
    result = dict(result_header(device), copy_bandwidth_gbs=copy_bw, launch_overhead_us=launch_us,
                  repeats=args.repeats, rows=[], summary=[])  # fmt: skip
    rows = result["rows"]
    bar = tqdm(total=len(args.configs), desc="decode benchmark", unit="config", mininterval=2.0)
    current = None
    for model_name, batch, prompt_len, n_new in args.configs:
        if current is None or current[0] != model_name:
            current = None
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            dtype_name = model_dtype(model_name, device, args.dtype)
            current = (model_name, dtype_name, *build_models(model_name, getattr(torch, dtype_name), device))
        _, dtype_name, hf, model, source = current
        bar.set_postfix_str(f"{model_name} b{batch} p{prompt_len} n{n_new}")
        if prompt_len + n_new <= model.config.n_positions:
            torch.manual_seed(1)
            ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
            _reset_engine_state(hf)
            m = measure_config(args.engines, hf, model, ids, n_new, device, args.repeats)
            nbytes = step_bytes(model, batch, prompt_len + n_new / 2)
            new = config_rows(model_name, source, dtype_name, batch, prompt_len, n_new, model, hf, m, nbytes, copy_bw)
            add_predictions(new, model, batch, prompt_len + n_new / 2, copy_bw, launch_us)
            rows += new
            _reset_engine_state(hf)
            result["summary"] = target_summary(rows)
            if save is not None:
                save(result)
        bar.update(1)
    bar.close()
    if not on_gpu:  # measured again at the end: the faster of the two (a busy start only slows it)
        result["copy_bandwidth_gbs"] = max(copy_bw, measure_cpu_copy_bandwidth_gbs())
        for row in rows:
            if row.get("step_gbs") is not None:
                row["roofline_frac"] = row["step_gbs"] / result["copy_bandwidth_gbs"]
            if row.get("predicted_tokens_per_s") is not None:  # the model's prediction, same bandwidth
                step_s = perf_model.predict_step_s(row["bytes_per_token"], row["launches_per_token"],
                                                   result["copy_bandwidth_gbs"], row["launch_overhead_us"])  # fmt: skip
                row.update(predicted_tokens_per_s=row["batch"] / step_s, predicted_ms_per_token=step_s * 1e3)
    return result


def default_configs(on_gpu: bool, full: bool) -> list[tuple[str, int, int, int]]:
    """(model, batch, prompt_len, new_tokens) of the default run or of ``--full``."""
    if full and on_gpu:
        gpt2 = [(m, b, p, n) for m in ("gpt2", "gpt2-medium", "gpt2-xl") for b in (1, 8, 64) for p in (16, 512)
                for n in (10, 50, 100, 200, 512)]  # fmt: skip
        llama = [(m, b, p, n) for m in LLAMA_GPU_MODELS for b in (1, 16, 64) for p in (16, 512) for n in (128, 256)]
        return gpt2 + llama
    if full:
        gpt2 = [(m, b, p, n) for m in ("small-d256", "gpt2", "gpt2-medium") for b in (1, 8) for p in (16, 256)
                for n in (32, 128)]  # fmt: skip
        return gpt2 + [(m, b, 16, 64) for m in LLAMA_CPU_MODELS for b in (1, 8)]
    n_new = 128 if on_gpu else 32
    main = [(m, b, 16, n_new) for m in ("small-d256", "gpt2") for b in (1, 8)]
    if on_gpu:  # issue 15's rows: the released shapes, bf16, the target rows' prompt and length
        llama = [(m, b, 128, 256) for m in LLAMA_GPU_MODELS for b in (1, 16)]
    else:  # issue 15's CPU target: small LLaMA- and Qwen-shaped models, batch 1, 64 new tokens
        llama = [(m, 1, 16, 64) for m in LLAMA_CPU_MODELS]
    context = [("small-d256", 1, p, n_new) for p in (128, 512)]
    return main + llama + context  # the headline rows first: an interrupted run keeps them


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="every model's dtype (default: CPU float32; GPU float16 for GPT-2, bfloat16 for the LLaMA family)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--prompt-len", nargs="+", type=int, default=None)
    p.add_argument("--new-tokens", nargs="+", type=int, default=None)
    p.add_argument("--engines", nargs="+", default=None, choices=ENGINES)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (default 3; --quick 1)")
    p.add_argument("--full", action="store_true", help="the whole matrix (long: an hour on a GPU)")
    p.add_argument("--quick", action="store_true", help="only the issue's target rows (for make gpu-check)")
    p.add_argument("--reference", action="store_true",
                   help="write the committed reference results benchmarks/results/decode_<device>.* (on purpose only)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--pdl", choices=["on", "off"], default="on",
                   help="off: also run fastgpt with FASTGPT_PDL=0 (engine fastgpt-pdl-off), side by side")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.configs = TARGET_CONFIGS if gpu else [("small-d256", 1, 16, 20), ("small-llama", 1, 16, 20)]
    else:
        args.configs = default_configs(gpu, args.full)
    # --models/--batch/--prompt-len/--new-tokens replace that axis of the chosen set.
    axes = (args.models, args.batch, args.prompt_len, args.new_tokens)
    if any(axes):
        values = [sorted({c[i] for c in args.configs}, key=[c[i] for c in args.configs].index) for i in range(4)]
        picked = [chosen or default for chosen, default in zip(axes, values)]
        args.configs = [(m, b, pl, n) for m in picked[0] for b in picked[1] for pl in picked[2] for n in picked[3]]
    if args.engines is None:
        args.engines = ["hf-eager", "hf-static", "fastgpt"]
        if gpu and (args.full or args.quick):
            args.engines = list(ENGINES) if args.full else ["hf-eager", "hf-static", "fastgpt-torch", "fastgpt-eager", "fastgpt"]
    if args.pdl == "off" and PDL_OFF_ENGINE not in args.engines:
        args.engines = [*args.engines, PDL_OFF_ENGINE]
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = output_dir(args.reference)
    result = run_suite(args, save=lambda partial: write_json(folder, "decode", partial))
    print_table(result)
    path = write_json(folder, "decode", result)
    print(f"wrote {path}")
    if not args.no_plots:
        from benchmarks.plots import plot_decode

        for written in plot_decode(result, path.parent, prefix=path.stem):
            print(f"wrote {written}")
    return result


if __name__ == "__main__":
    main()
