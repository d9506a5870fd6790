"""Decode benchmark: fastgpt against Hugging Face ``generate`` on GPT-2-shaped models.

``python -m benchmarks.decode [--quick]`` (``make bench``). Every engine runs on the same weights
(random unless real ones are on disk: speed does not depend on the values) in one run, and every
engine's greedy tokens are compared with HF eager's, so no speed is reported for a wrong answer.

Engines: ``hf-eager`` (HF ``generate``, dynamic cache), ``hf-static`` (``cache_implementation=
"static"``, ``disable_compile=True``), ``hf-static-compiled`` (the same, with HF compiling the
forward), ``fastgpt-torch`` (the PyTorch reference ops, eager), ``fastgpt-eager`` (the Triton
kernels, eager step), ``fastgpt`` (Triton kernels + the CUDA-graph decode step).

Default matrix on a GPU (fp16): models gpt2, gpt2-medium, gpt2-xl; batch {1, 8, 64}; prompt
{16, 512}; new tokens {10, 50, 100, 200, 512}; subsets via ``--models/--batch/--prompt-len/
--new-tokens/--engines``. ``--quick`` (``make gpu-check``): the issue's target rows (fp16, 128-token
prompt, 256 new tokens: gpt2 at batch 1 and 64, gpt2-xl at batch 1) with HF eager/static beside
them. Without a GPU: a small CPU configuration with the PyTorch backend, and it says so.

Per row
-------
* ``tokens_per_s``: all rows' new tokens over the whole warm ``generate`` call (prefill included).
* ``ms_per_token``: one decode step, ``(t(n) - t(1)) / (n - 1)`` from a warm n-token call and a
  warm 1-token call (prefill only); ``ms_per_token_e2e`` = ``t(n) / n``.
* ``step_bytes``: what one step must read -- every weight once (the position table counted as
  the ``B`` rows read) plus the live K and V of every layer at the mean context
  ``prompt_len + new_tokens / 2``; ``step_gbs`` = step_bytes / step time; ``roofline_frac`` =
  step_gbs / the device-to-device copy bandwidth measured at the start of the same run.
* ``speedup_vs_hf_eager`` / ``speedup_vs_hf_static``: ratio of the warm ``generate`` times.
* ``greedy_match``: tokens identical to HF eager's; ``match_prefix_min``: new tokens equal before
  the first divergence (over rows); on a divergence ``divergence_gap`` is the difference of the
  two competing tokens' logits at that position (fastgpt forward, model dtype) relative to the
  largest logit, and ``divergence_near_tie`` says whether it is below ``NEAR_TIE`` (fp16/bf16
  kernels legitimately break near-ties differently; fp32 must be identical).
* ``first_call_s``: the cold first call (for ``fastgpt``: includes the CUDA-graph capture,
  ``capture_s``); every other time is warm. ``graph``: what fastgpt's warm call did.
* ``peak_mem_mb`` = the engine's weights + the peak of everything else allocated during its warm
  calls (persistent graph state included); ``weights_mb``, ``kv_cache_mb`` (``2 * L * B * (T + n) *
  C`` elements), ``workspace_mb`` = peak - weights - KV cache.

Output: a table on stdout (with a tqdm progress bar and ETA while running), JSON via
``write_results("decode")`` (``decode_cpu`` on a CPU) with top-level ``device``, ``date``,
``commit``, ``versions``, ``copy_bandwidth_gbs``, ``rows`` and ``summary`` (the issue's targets),
and two PNG plots (``benchmarks/plots.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch

from benchmarks.common import env_override, measure_copy_bandwidth_gbs, result_header, write_results

ENGINES = ("hf-eager", "hf-static", "hf-static-compiled", "fastgpt-torch", "fastgpt-eager", "fastgpt")
FASTGPT_ENV = {  # engine -> (FASTGPT_BACKEND, FASTGPT_CUDA_GRAPH); None: unset (auto)
    "fastgpt-torch": ("torch", "0"),
    "fastgpt-eager": (None, "0"),
    "fastgpt": (None, None),
}
#: Relative logit gap under which a greedy divergence counts as a near-tie (fp16 rounding).
NEAR_TIE = 1e-2
TARGET_CONFIGS = [("gpt2", 1, 128, 256), ("gpt2", 64, 128, 256), ("gpt2-xl", 1, 128, 256)]


# --------------------------------------------------------------------------------------------
# Models and engines
# --------------------------------------------------------------------------------------------
def build_models(name: str, dtype: torch.dtype, device: torch.device):
    """(hf_model, fastgpt_model, source) with shared weight values."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fastgpt import GPT, GPTConfig
    from fastgpt.loading import find_checkpoint

    hf_logging.set_verbosity_error()
    if name == "small-d256":
        cfg = GPTConfig(n_embd=256, n_head=8, n_layer=4)
    else:
        cfg = GPTConfig.from_preset(name)
        with contextlib.suppress(FileNotFoundError):
            path = find_checkpoint(name)
            hf = GPT2LMHeadModel.from_pretrained(path, dtype=dtype).to(device).eval()
            return hf, GPT.from_hf(hf), f"weights from {path}"
    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(GPT2Config(**{**cfg.to_hf().to_dict(), "pad_token_id": 0})).to(dtype).eval()
    return hf, GPT.from_hf(hf), "random"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()




def make_runner(engine: str, hf, model, ids: torch.Tensor, n_new: int):
    """A zero-argument callable running one greedy generation of exactly ``n_new`` tokens.

    A 1-token fastgpt run (prefill only, for the step time) never uses a CUDA graph: it has no
    decode step, and capturing one for its shape would only cost time and memory.
    """
    if engine.startswith("hf"):
        kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        if engine != "hf-eager":
            kwargs["cache_implementation"] = "static"
            # On CUDA, HF compiles the static-cache forward by itself unless told not to.
            kwargs["disable_compile"] = engine == "hf-static"
        mask = torch.ones_like(ids)
        return lambda: hf.generate(ids, attention_mask=mask, **kwargs)
    backend, graph = FASTGPT_ENV[engine]
    if n_new == 1:
        graph = "0"

    def run():
        with env_override(FASTGPT_BACKEND=backend, FASTGPT_CUDA_GRAPH=graph):
            return model.generate(ids, n_new)

    return run


def _reset_engine_state(hf) -> None:
    """Free what an earlier configuration left behind (graphs, HF's static-cache length)."""
    from fastgpt.cuda_graph import clear_graph_cache

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


def measure_engine(engine, hf, model, ids, n_new, device, repeats) -> dict:
    """Cold call, warm calls (median), a warm 1-token call for the step time, peak memory."""
    from fastgpt import kernels_report, reset_kernels_report
    from fastgpt import last_generate_stats

    on_gpu = device.type == "cuda"
    run, run_one = make_runner(engine, hf, model, ids, n_new), make_runner(engine, hf, model, ids, 1)
    if on_gpu:
        base = torch.cuda.memory_allocated()
    reset_kernels_report()
    cold, out = _timed(run, device)
    first = last_generate_stats() if engine.startswith("fastgpt") else None
    kernels = kernels_report() if engine.startswith("fastgpt") else None
    _timed(run_one, device)  # warm the 1-token shape too (its own prefill plan)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, one, warm = [], [], None
    for _ in range(repeats):
        seconds, out = _timed(run, device)
        times.append(seconds)
        if engine.startswith("fastgpt"):
            warm = last_generate_stats()  # of the n-token call (a 1-token call has no decode step)
        one.append(_timed(run_one, device)[0])
    times.sort()
    one.sort()
    total = times[len(times) // 2]
    step = (total - one[len(one) // 2]) / (n_new - 1) if n_new > 1 else total
    result = dict(total_s=total, step_s=max(step, 1e-9), out=out, cold_s=cold, kernels=kernels)
    if first is not None:
        result["graph"] = dict(first_call=_graph_summary(first), warm=_graph_summary(warm))
        result["capture_s"] = first.get("capture_s", 0.0)
    if on_gpu:
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    return result


def _graph_summary(stats: dict | None) -> dict | None:
    if stats is None:
        return None
    return {k: stats.get(k) for k in ("path", "captured", "capture_s", "reason", "decode_steps")}


# --------------------------------------------------------------------------------------------
# Bytes, comparison
# --------------------------------------------------------------------------------------------
def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (of the position table only the ``B``
    rows used) + the live K and V of every layer."""
    c = model.config
    item = model.dtype.itemsize
    weights = weights_bytes(model) - model.wpe.weight.numel() * item + batch * c.n_embd * item
    kv = 2 * c.n_layer * batch * context * c.n_embd * item
    return weights + kv


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
def run_suite(args) -> dict:
    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    copy_bw = measure_copy_bandwidth_gbs(device) if on_gpu else None
    if not on_gpu:
        print("No GPU: running a small CPU configuration with the PyTorch backend (numbers are CPU numbers).")
    configs = args.configs or [
        (m, b, p, n) for m in args.models for b in args.batch for p in args.prompt_len for n in args.new_tokens
    ]
    rows = []
    bar = tqdm(total=len(configs) * len(args.engines), desc="decode benchmark", unit="run", mininterval=2.0)
    current = None
    for model_name, batch, prompt_len, n_new in configs:
        if current is None or current[0] != model_name:
            current = None
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            hf, model, source = build_models(model_name, dtype, device)
            current = (model_name, hf, model, source)
        _, hf, model, source = current
        if prompt_len + n_new > model.config.n_positions:
            bar.update(len(args.engines))
            continue
        torch.manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        c = model.config
        item = model.dtype.itemsize
        context = prompt_len + n_new / 2
        nbytes = step_bytes(model, batch, context)
        w_mb = weights_bytes(model) / 2**20
        kv_mb = 2 * c.n_layer * batch * (prompt_len + n_new) * c.n_embd * item / 2**20
        config_rows, outputs, totals = [], {}, {}
        for engine in args.engines:
            bar.set_postfix_str(f"{model_name} b{batch} p{prompt_len} n{n_new} {engine}")
            _reset_engine_state(hf)
            try:
                m = measure_engine(engine, hf, model, ids, n_new, device, args.repeats)
            except Exception as exc:  # an engine that cannot run here (compile, OOM) is reported, not fatal
                rows.append(
                    dict(engine=engine, model=model_name, batch=batch, prompt_len=prompt_len, new_tokens=n_new,
                         error=f"{type(exc).__name__}: {exc}"[:300])
                )  # fmt: skip
                _reset_engine_state(hf)
                bar.update(1)
                continue
            outputs[engine], totals[engine] = m["out"], m["total_s"]
            gbs = nbytes / m["step_s"] / 1e9
            row = dict(
                engine=engine,
                model=model_name,
                weights=source,
                dtype=args.dtype,
                batch=batch,
                prompt_len=prompt_len,
                new_tokens=n_new,
                tokens_per_s=batch * n_new / m["total_s"],
                ms_per_token=m["step_s"] * 1e3,
                ms_per_token_e2e=m["total_s"] / n_new * 1e3,
                first_call_s=m["cold_s"],
                step_bytes=nbytes,
                step_gbs=gbs,
                roofline_frac=(gbs / copy_bw) if copy_bw else None,
                kernels=m["kernels"],
            )
            if "graph" in m:
                row.update(graph=m["graph"], capture_s=m["capture_s"])
            if "peak_extra_bytes" in m:
                own_weights = w_mb if engine.startswith("fastgpt") else weights_bytes(hf) / 2**20
                peak = own_weights + m["peak_extra_bytes"] / 2**20
                row.update(
                    peak_mem_mb=peak, weights_mb=own_weights, kv_cache_mb=kv_mb, workspace_mb=peak - own_weights - kv_mb
                )
            config_rows.append(row)
            bar.update(1)
        ref = outputs.get("hf-eager")
        for row in config_rows:
            if ref is not None:
                row.update(compare_greedy(outputs[row["engine"]], ref, prompt_len, model))
            for base in ("hf-eager", "hf-static"):
                if base in totals:
                    row[f"speedup_vs_{base.replace('-', '_')}"] = totals[base] / totals[row["engine"]]
        rows += config_rows
        _reset_engine_state(hf)
    bar.close()
    return dict(result_header(device), copy_bandwidth_gbs=copy_bw, rows=rows, summary=target_summary(rows))


def _match_text(r: dict) -> tuple[str, bool | None]:
    if "greedy_match" not in r:
        return "not compared", None
    if r["greedy_match"]:
        return "identical", True
    if r.get("divergence_near_tie"):
        return f"near-tie after {r['match_prefix_min']} tokens", True
    return f"MISMATCH after {r['match_prefix_min']} tokens (gap {r.get('divergence_gap', float('nan')):.3g})", False


def target_summary(rows: list[dict]) -> list[dict]:
    """The issue's targets (H100, fp16, 128-token prompt, 256 new tokens, warm) for the rows present."""

    def find(engine, model, batch):
        for r in rows:
            if "error" in r:
                continue
            key = (r["engine"], r["model"], r["batch"], r["prompt_len"], r["new_tokens"])
            if key == (engine, model, batch, 128, 256):
                return r
        return None

    out = []

    def add(metric: str, value, target: str, met: bool | None) -> None:
        out.append(dict(metric=metric, value=value, target=target, met=met))

    if (r := find("fastgpt", "gpt2", 1)) is not None:
        add("decode gpt2 b1 tokens/s", r["tokens_per_s"], ">= 5000", r["tokens_per_s"] >= 5000)
        if r.get("roofline_frac") is not None:
            add("decode gpt2 b1 roofline", r["roofline_frac"], "> 0.40", r["roofline_frac"] > 0.4)
        for base, goal in (("hf_eager", 70), ("hf_static", 15)):
            if f"speedup_vs_{base}" in r:
                value = r[f"speedup_vs_{base}"]
                add(f"decode gpt2 b1 speed-up vs {base}", value, f">= {goal}x", value >= goal)
        text, ok = _match_text(r)
        add("decode gpt2 b1 greedy vs HF eager", text, "identical or near-tie", ok)
        if r.get("graph") and r["graph"].get("warm"):
            path = str(r["graph"]["warm"]["path"])
            add("decode gpt2 b1 warm decode path", path, "graph", path == "graph")
        if r.get("peak_mem_mb") is not None:
            add("decode gpt2 b1 peak memory MB (weights+KV+workspace)", r["peak_mem_mb"], "report", None)
    if (r := find("fastgpt", "gpt2-xl", 1)) is not None and r.get("roofline_frac") is not None:
        add("decode gpt2-xl b1 roofline", r["roofline_frac"], ">= 0.80", r["roofline_frac"] >= 0.8)
        text, ok = _match_text(r)
        add("decode gpt2-xl b1 greedy vs HF eager", text, "identical or near-tie", ok)
    if (r := find("fastgpt", "gpt2", 64)) is not None and "speedup_vs_hf_eager" in r:
        value = r["speedup_vs_hf_eager"]
        add("decode gpt2 b64 speed-up vs hf_eager", value, ">= 10x", value >= 10)
    return out


def print_table(result: dict) -> None:
    bw = result["copy_bandwidth_gbs"]
    print(f"\n{result['device']}  commit {result['commit']}  copy bandwidth {f'{bw:.0f}' if bw else '-'} GB/s")
    head = (
        f"{'engine':<19}{'model':<12}{'B':>4}{'prompt':>7}{'new':>5}{'tok/s':>10}{'ms/step':>9}{'roofline':>9}"
        f"{'x eager':>8}{'x static':>9}{'peak MB':>9}  greedy vs HF eager"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(
                f"{r['engine']:<19}{r['model']:<12}{r.get('batch', ''):>4}{r.get('prompt_len', ''):>7}"
                f"{r.get('new_tokens', ''):>5}  error: {r['error'][:90]}"
            )
            continue
        roof = f"{100 * r['roofline_frac']:.1f}%" if r.get("roofline_frac") is not None else "-"
        sx_e = f"{r['speedup_vs_hf_eager']:.2f}" if "speedup_vs_hf_eager" in r else "-"
        sx_s = f"{r['speedup_vs_hf_static']:.2f}" if "speedup_vs_hf_static" in r else "-"
        peak = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"
        print(
            f"{r['engine']:<19}{r['model']:<12}{r['batch']:>4}{r['prompt_len']:>7}{r['new_tokens']:>5}"
            f"{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>9.3f}{roof:>9}{sx_e:>8}{sx_s:>9}{peak:>9}  {_match_text(r)[0]}"
        )
    said = set()
    for r in result["rows"]:
        graph = r.get("graph")
        if graph and graph["first_call"] and graph["first_call"].get("captured"):
            print(
                f"  {r['engine']} {r['model']} b{r['batch']} p{r['prompt_len']} n{r['new_tokens']}: first call "
                f"{r['first_call_s']:.2f} s including CUDA-graph capture {r['capture_s']:.3f} s (warm numbers above)"
            )
        elif graph and graph["warm"] and graph["warm"]["path"] != "graph":
            line = f"  {r['engine']} {r['model']}: eager decode ({graph['warm']['reason']})"
            if line not in said:
                said.add(line)
                print(line)
    if result.get("summary"):
        print("\ntargets:")
        for s in result["summary"]:
            value = f"{s['value']:.3g}" if isinstance(s["value"], float) else str(s["value"])
            met = {True: "MET", False: "missed", None: "-"}[s["met"]]
            print(f"  {s['metric']:<58}{value:>28}  target {s['target']:<22}{met}")


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default="float16" if on_gpu else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--prompt-len", nargs="+", type=int, default=None)
    p.add_argument("--new-tokens", nargs="+", type=int, default=None)
    p.add_argument("--engines", nargs="+", default=None, choices=ENGINES)
    p.add_argument("--repeats", type=int, default=None, help="warm calls per row (median)")
    p.add_argument("--name", default="decode", help="results file name (without .json)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quick", action="store_true", help="only the issue's target rows (for make gpu-check)")
    args = p.parse_args(argv)
    args.configs = None
    if args.quick:
        args.configs = TARGET_CONFIGS if on_gpu else [("small-d256", 1, 16, 20)]
    if on_gpu:
        args.models = args.models or ["gpt2", "gpt2-medium", "gpt2-xl"]
        args.batch = args.batch or [1, 8, 64]
        args.prompt_len = args.prompt_len or [16, 512]
        args.new_tokens = args.new_tokens or [10, 50, 100, 200, 512]
        args.engines = args.engines or (
            ["hf-eager", "hf-static", "fastgpt-torch", "fastgpt-eager", "fastgpt"] if args.quick else list(ENGINES)
        )
        args.repeats = args.repeats or (1 if args.quick else 3)
    else:
        # Small enough for a couple of minutes on 2 cores; "fastgpt" is the torch backend here.
        args.models = args.models or ["small-d256", "gpt2"]
        args.batch = args.batch or [1]
        args.prompt_len = args.prompt_len or [16]
        args.new_tokens = args.new_tokens or [10, 50, 100, 200]
        args.engines = args.engines or ["hf-eager", "fastgpt"]
        args.repeats = args.repeats or 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_suite(args)
    print_table(result)
    on_gpu = args.device.startswith("cuda")
    name = args.name if on_gpu else f"{args.name}_cpu"
    path = write_results(name, result)
    if not args.no_plots:
        from benchmarks.plots import plot_decode

        for written in plot_decode(result, path.parent, prefix=name):
            print(f"wrote {written}")
    return result


if __name__ == "__main__":
    main()
