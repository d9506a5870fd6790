"""Decode benchmark: fastgpt against Hugging Face ``generate`` on GPT-2-shaped models.

``python -m benchmarks.decode`` (``make bench``). Every engine runs on the same weights (random
unless real ones are on disk: speed does not depend on the values) in one run, and fastgpt's
greedy tokens are compared with HF eager's, so no speed is reported for a wrong answer.

Per row: tokens/s (all rows of the batch, new tokens over the whole generate call, prefill
included), ms per decode step, the bytes one step must read (weights + the live KV cache) over
the step time as GB/s and as a fraction of the copy bandwidth measured in the same run (the
roofline), and the speed-ups over HF eager and HF static.

Without a GPU it runs a small configuration on the CPU and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from benchmarks.common import measure_copy_bandwidth_gbs, result_header, write_results

ENGINES = ("hf-eager", "hf-static", "hf-static-compiled", "fastgpt-torch", "fastgpt")


def build_models(name: str, dtype: torch.dtype, device: torch.device, small: bool = False):
    """(hf_model, fastgpt_model, source) with shared weight values."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fastgpt import GPT, GPTConfig
    from fastgpt.loading import find_checkpoint

    hf_logging.set_verbosity_error()
    source = "random"
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
    return hf, GPT.from_hf(hf), source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _backend_env(value: str | None):
    old = os.environ.get("FASTGPT_BACKEND")
    if value is None:
        os.environ.pop("FASTGPT_BACKEND", None)
    else:
        os.environ["FASTGPT_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTGPT_BACKEND", None)
        else:
            os.environ["FASTGPT_BACKEND"] = old


def make_runner(engine: str, hf, model, ids: torch.Tensor, n_new: int):
    """A zero-argument callable running one greedy generation of exactly ``n_new`` tokens."""
    if engine.startswith("hf"):
        kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        if engine != "hf-eager":
            kwargs["cache_implementation"] = "static"
            # On CUDA, HF compiles the static-cache forward by itself unless told not to.
            kwargs["disable_compile"] = engine == "hf-static"
        return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    backend = "torch" if engine == "fastgpt-torch" else None

    def run():
        with _backend_env(backend):
            return model.generate(ids, n_new)

    return run


def time_engine(run, device: torch.device, repeats: int) -> tuple[float, torch.Tensor, float]:
    """(median seconds of warm runs, output tokens, seconds of the first, cold, run)."""
    start = time.perf_counter()
    out = run()
    _sync(device)
    cold = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out, cold


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once + the live K/V of every layer."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * c.n_layer * batch * context * c.n_embd * model.dtype.itemsize
    return weights + kv


def run_suite(args) -> dict:
    from tqdm import tqdm

    from fastgpt import kernels_report, reset_kernels_report

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
    bar = tqdm(total=len(configs) * len(args.engines), desc="decode benchmark", unit="run")
    current = None
    for model_name, batch, prompt_len, n_new in configs:
        if current is None or current[0] != model_name:
            current = None
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
        outputs, timings = {}, {}
        for engine in args.engines:
            bar.set_postfix_str(f"{model_name} b{batch} p{prompt_len} n{n_new} {engine}")
            try:
                reset_kernels_report()
                seconds, out, cold = time_engine(make_runner(engine, hf, model, ids, n_new), device, args.repeats)
            except Exception as exc:  # an engine that cannot run here (e.g. compile) is reported, not fatal
                rows.append(dict(engine=engine, model=model_name, error=f"{type(exc).__name__}: {exc}"[:300]))
                bar.update(1)
                continue
            outputs[engine], timings[engine] = out, seconds
            context = prompt_len + n_new / 2
            ms_per_token = seconds / n_new * 1e3
            gbs = step_bytes(model, batch, context) / (seconds / n_new) / 1e9
            rows.append(
                dict(
                    engine=engine,
                    model=model_name,
                    weights=source,
                    dtype=args.dtype,
                    batch=batch,
                    prompt_len=prompt_len,
                    new_tokens=n_new,
                    tokens_per_s=batch * n_new / seconds,
                    ms_per_token=ms_per_token,
                    first_call_s=cold,
                    step_gbs=gbs,
                    roofline_frac=(gbs / copy_bw) if copy_bw else None,
                    kernels=kernels_report() if engine.startswith("fastgpt") else None,
                )
            )
            bar.update(1)
        ref = outputs.get("hf-eager")
        for row in rows:
            if row.get("model") != model_name or "error" in row:
                continue
            if (row["batch"], row["prompt_len"], row["new_tokens"]) != (batch, prompt_len, n_new):
                continue
            out = outputs.get(row["engine"])
            if ref is not None and out is not None:
                same = (out == ref).all(dim=1)
                row["greedy_match"] = bool(same.all())
                mismatch = (out != ref).int().argmax(dim=1)
                row["match_prefix_min"] = int(torch.where(same, out.shape[1], mismatch).min()) - prompt_len
            for base in ("hf-eager", "hf-static"):
                if base in timings:
                    row[f"speedup_vs_{base.replace('-', '_')}"] = timings[base] / timings[row["engine"]]
    bar.close()
    return dict(result_header(device), copy_bandwidth_gbs=copy_bw, rows=rows, summary=target_summary(rows))


def target_summary(rows: list[dict]) -> list[dict]:
    """The issue's targets (H100, fp16, 128-token prompt, 256 new tokens) for the rows present."""

    def find(model, batch):
        for r in rows:
            if (r.get("engine"), r.get("model"), r.get("batch"), r.get("prompt_len"), r.get("new_tokens")) == (
                "fastgpt", model, batch, 128, 256
            ):
                return r
        return None

    out = []
    if (r := find("gpt2", 1)) is not None:
        out.append(dict(metric="decode gpt2 b1 tokens/s", value=r["tokens_per_s"], target=">= 5000", met=r["tokens_per_s"] >= 5000))
        if r.get("roofline_frac") is not None:
            out.append(dict(metric="decode gpt2 b1 roofline", value=r["roofline_frac"], target="> 0.40", met=r["roofline_frac"] > 0.4))
        out.append(dict(metric="decode gpt2 b1 greedy equal to HF", value=str(r.get("greedy_match")), target="True", met=r.get("greedy_match")))
    if (r := find("gpt2-xl", 1)) is not None and r.get("roofline_frac") is not None:
        out.append(dict(metric="decode gpt2-xl b1 roofline", value=r["roofline_frac"], target=">= 0.80", met=r["roofline_frac"] >= 0.8))
    if (r := find("gpt2", 64)) is not None and "speedup_vs_hf_eager" in r:
        out.append(dict(metric="decode gpt2 b64 speed-up vs HF eager", value=r["speedup_vs_hf_eager"], target=">= 10x", met=r["speedup_vs_hf_eager"] >= 10))
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}  copy bandwidth {result['copy_bandwidth_gbs'] or '-'} GB/s")
    head = f"{'engine':<20}{'model':<12}{'B':>4}{'prompt':>7}{'new':>5}{'tok/s':>10}{'ms/tok':>9}{'roofline':>9}{'x eager':>8}{'x static':>9}  match"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['engine']:<20}{r['model']:<12}  error: {r['error'][:80]}")
            continue
        roof = f"{100 * r['roofline_frac']:.1f}%" if r.get("roofline_frac") else "-"
        sx_e = f"{r['speedup_vs_hf_eager']:.2f}" if "speedup_vs_hf_eager" in r else "-"
        sx_s = f"{r['speedup_vs_hf_static']:.2f}" if "speedup_vs_hf_static" in r else "-"
        print(
            f"{r['engine']:<20}{r['model']:<12}{r['batch']:>4}{r['prompt_len']:>7}{r['new_tokens']:>5}"
            f"{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>9.2f}{roof:>9}{sx_e:>8}{sx_s:>9}  {r.get('greedy_match', '-')}"
        )


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default="float16" if on_gpu else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-len", nargs="+", type=int, default=[16])
    p.add_argument("--new-tokens", nargs="+", type=int, default=[10, 50, 100, 200])
    p.add_argument("--engines", nargs="+", default=None, choices=ENGINES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="decode", help="results file name (without .json)")
    p.add_argument("--quick", action="store_true", help="only the issue's target rows (for make gpu-check)")
    args = p.parse_args(argv)
    args.configs = None
    if args.quick:  # the targets: fp16, 128-token prompt, 256 new tokens; GPT-2 small b1/b64, XL b1
        args.configs = [("gpt2", 1, 128, 256), ("gpt2", 64, 128, 256), ("gpt2-xl", 1, 128, 256)] if on_gpu else [
            ("small-d256", 1, 16, 50)
        ]
        args.repeats = 1
    if args.models is None:
        args.models = ["gpt2"] if on_gpu else ["small-d256", "gpt2"]
    if args.engines is None:
        args.engines = ["hf-eager", "hf-static", "fastgpt-torch", "fastgpt"] if on_gpu else ["hf-eager", "fastgpt"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_suite(args)
    print_table(result)
    write_results(args.name if torch.cuda.is_available() else f"{args.name}_cpu", result)
    return result


if __name__ == "__main__":
    main()
