"""Beam-search benchmark: fastgpt against Hugging Face ``generate(num_beams=4)`` on GPT-2 small.

``python -m benchmarks.beam [--quick]``. Both engines run the same random weights (speed does not
depend on the values; the weights are widened as in the tests so that beams diverge and the
token comparison means something), with no EOS id so every call runs exactly ``new_tokens``
steps. Per row:

* ``tokens_per_s``: returned tokens (``batch * new_tokens``) over the warm ``generate`` call;
  ``beam_tokens_per_s`` counts every beam (``batch * num_beams * new_tokens``).
* ``speedup_vs_hf``: HF's median time over fastgpt's, same config, same run.
* ``match``: fastgpt's sequences equal HF's (expected in float32; in float16 the two
  implementations round differently and beams may part, reported, not asserted).

On a GPU the default is float16, batch {1, 8}, prompt 32, 128 new tokens, plus a float32 row used
for the token-equality entry of the summary; ``--quick`` (under a minute on an H100) runs batch 1
only. Without a GPU a small CPU configuration runs (the PyTorch backend) and says so.

Writes ``beam_<device>.json`` into a git-ignored run folder (``benchmarks/run_folder.py``);
``--reference`` writes the committed ``benchmarks/results/beam_<device>.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import result_header
from benchmarks.run_folder import write_run

NUM_BEAMS = 4


def build_models(name: str, dtype: torch.dtype, device: torch.device):
    """(hf_model, fastgpt_model) sharing widened random weights of preset ``name`` (or a small CPU shape)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fastgpt import GPT, GPTConfig

    hf_logging.set_verbosity_error()
    cfg = GPTConfig(n_embd=256, n_head=8, n_layer=4) if name == "small-d256" else GPTConfig.from_preset(name)
    torch.manual_seed(0)
    hf_config = GPT2Config(**{**cfg.to_hf().to_dict(), "pad_token_id": 0, "eos_token_id": None, "bos_token_id": None})
    with torch.device(device):
        hf = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # wider than GPT-2's 0.02 init: peaked logits, beams that diverge
        for pname, p in hf.named_parameters():
            if "ln_" in pname and pname.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.08)
    hf = hf.to(dtype)
    return hf, GPT.from_hf(hf)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """(median seconds over ``repeats`` warm calls, the last output); one untimed warm-up first."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def run_config(hf, model, *, model_name, dtype_name, batch, prompt_len, new_tokens, device, repeats) -> list[dict]:
    from fastgpt import kernels_report, reset_kernels_report

    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=new_tokens, num_beams=NUM_BEAMS, do_sample=False)

    def run_hf():
        return hf.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)

    def run_fast():
        return model.generate(ids, **kwargs)

    rows, outputs, seconds = [], {}, {}
    for engine, fn in (("hf", run_hf), ("fastgpt", run_fast)):
        reset_kernels_report()
        try:
            seconds[engine], outputs[engine] = time_call(fn, device, repeats)
        except Exception as exc:  # reported, not fatal: the other engine's row still counts
            rows.append(dict(engine=engine, model=model_name, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        n_out = outputs[engine].shape[1] - prompt_len
        rows.append(
            dict(
                engine=engine,
                model=model_name,
                dtype=dtype_name,
                num_beams=NUM_BEAMS,
                batch=batch,
                prompt_len=prompt_len,
                new_tokens=n_out,
                seconds=seconds[engine],
                tokens_per_s=batch * n_out / seconds[engine],
                beam_tokens_per_s=batch * NUM_BEAMS * n_out / seconds[engine],
                ms_per_step=seconds[engine] / max(n_out, 1) * 1e3,
                kernels=kernels_report() if engine == "fastgpt" else None,
            )
        )
    if "hf" in outputs and "fastgpt" in outputs:
        a, b = outputs["fastgpt"], outputs["hf"]
        match = a.shape == b.shape and bool(torch.equal(a, b))
        for row in rows:
            if "error" in row:
                continue
            row["match"] = match
            if row["engine"] == "fastgpt":
                row["speedup_vs_hf"] = seconds["hf"] / seconds["fastgpt"]
    return rows


def summarize(rows: list[dict], on_gpu: bool) -> list[dict]:
    out = []
    for r in rows:
        if r.get("engine") != "fastgpt" or "error" in r:
            continue
        tag = f"beam{r['num_beams']} {r['model']} b{r['batch']} {r['dtype']}"
        out.append(dict(metric=f"{tag} tokens/s", value=r["tokens_per_s"], target="report", met=None))
        if "speedup_vs_hf" in r:
            speedup = r["speedup_vs_hf"]
            out.append(dict(metric=f"{tag} speed-up vs HF generate", value=speedup, target="> 1x", met=speedup > 1.0))
        if r["dtype"] == "float32" and "match" in r:
            match = r["match"]
            out.append(dict(metric=f"{tag} sequences equal to HF", value=str(match), target="True", met=match))
    for r in rows:
        if "error" in r:
            metric = f"beam {r['engine']} {r['model']} error"
            out.append(dict(metric=metric, value=r["error"][:120], target="no error", met=False))
    if not on_gpu:
        for entry in out:
            entry["metric"] += " (CPU)"
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}  beam search, {NUM_BEAMS} beams")
    head = (
        f"{'engine':<9}{'model':<12}{'dtype':<9}{'B':>3}{'prompt':>7}{'new':>5}"
        f"{'tok/s':>10}{'beam tok/s':>11}{'ms/step':>9}{'x HF':>7}  match"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['engine']:<9}{r['model']:<12}  error: {r['error'][:80]}")
            continue
        speed = f"{r['speedup_vs_hf']:.2f}" if "speedup_vs_hf" in r else "-"
        print(
            f"{r['engine']:<9}{r['model']:<12}{r['dtype']:<9}{r['batch']:>3}{r['prompt_len']:>7}{r['new_tokens']:>5}"
            f"{r['tokens_per_s']:>10.1f}{r['beam_tokens_per_s']:>11.1f}{r['ms_per_step']:>9.2f}{speed:>7}"
            f"  {r.get('match', '-')}"
        )


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--model", default=None, help="gpt2 preset name (default: gpt2 on a GPU, a small shape on the CPU)")
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats (for make gpu-check)")
    p.add_argument("--reference", action="store_true",
                   help="write the committed reference results benchmarks/results/beam_<device>.json (on purpose only)")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.model = args.model or ("gpt2" if gpu else "small-d256")
    args.batch = args.batch or ([1] if args.quick or not gpu else [1, 8])
    args.prompt_len = args.prompt_len or (32 if gpu else 8)
    args.new_tokens = args.new_tokens or (128 if gpu else 16)
    if args.quick:
        args.repeats = 2 if gpu else 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("No GPU: running a small CPU configuration with the PyTorch backend (numbers are CPU numbers).")
    # float16 for speed on a GPU, plus float32 for the token-equality check; float32 only on the CPU.
    dtypes = ["float16", "float32"] if on_gpu else ["float32"]
    rows = []
    for dtype_name in dtypes:
        hf, model = build_models(args.model, getattr(torch, dtype_name), device)
        for batch in args.batch if dtype_name == dtypes[0] else args.batch[:1]:
            rows += run_config(
                hf,
                model,
                model_name=args.model,
                dtype_name=dtype_name,
                batch=batch,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens if dtype_name == dtypes[0] else min(args.new_tokens, 48),
                device=device,
                repeats=args.repeats if dtype_name == dtypes[0] else 1,
            )
        del hf, model
        if on_gpu:
            torch.cuda.empty_cache()
    result = dict(result_header(device), num_beams=NUM_BEAMS, rows=rows, summary=summarize(rows, on_gpu))
    print_table(result)
    write_run("beam", result, reference=args.reference)
    return result


if __name__ == "__main__":
    main()
