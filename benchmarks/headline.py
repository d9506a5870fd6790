"""The headline stage of ``make gpu-check``: fastgpt against HF eager ``generate``, row by row.

``python -m benchmarks.headline``: 128-token prompt, 256 new tokens (the decode benchmark's
target rows), in order of value: gpt2 batch 1 (fp16), llama-3.2-1b batch 1 (bf16: issue 15's
target, >= 75 % of the roofline; random weights, HF's ``LlamaForCausalLM`` and fastgpt's copy of
it), gpt2-xl batch 1, gpt2 batch 64 (fp16). The dtype of a row is
``benchmarks.decode.model_dtype``'s: float16 for GPT-2, bfloat16 for the LLaMA family. Each engine's row
is recorded (``benchmarks.gpu_check.record``) as soon as it is measured, so a run cut short keeps
what it finished; the fastgpt row carries the greedy match against HF eager, the speed-up and
the performance model's fields (``benchmarks.perf_model``: ``predicted_tokens_per_s``,
``launches_per_token``, ``bytes_per_token``, ``launch_overhead_us``; the note row has the launch
overhead measured in this run).
Measurement, byte counts and the comparison are the decode benchmark's (``benchmarks.decode``).

Without a GPU (the dry run) two tiny rows on the CPU (float32), a GPT-2 and a LLaMA-family one,
prove the plumbing.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks import decode, perf_model
from benchmarks.common import measure_copy_bandwidth_gbs
from benchmarks.gpu_check_log import record

#: (model, batch, prompt_len, new_tokens), most valuable first.
GPU_ROWS = [("gpt2", 1, 128, 256), ("llama-3.2-1b", 1, 128, 256), ("gpt2-xl", 1, 128, 256), ("gpt2", 64, 128, 256)]
CPU_ROWS = [("small-d256", 1, 8, 8), ("tiny-llama", 1, 8, 8)]
ENGINES = ("hf-eager", "fastgpt")
STAGE = "headline"


def measure_row(model_name: str, batch: int, prompt_len: int, n_new: int, device, dtype, copy_gbs,
                launch_us: float | None = None) -> None:  # fmt: skip
    hf, model, source = decode.build_models(model_name, dtype, device)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    step_bytes = decode.step_bytes(model, batch, prompt_len + n_new / 2)
    base = dict(model=model_name, weights=source, dtype=str(dtype).replace("torch.", ""), batch=batch,
                prompt_len=prompt_len, new_tokens=n_new)  # fmt: skip
    outputs, totals = {}, {}
    for engine in ENGINES:
        decode._reset_engine_state(hf)
        start = time.perf_counter()
        try:
            m = decode.measure_engine(engine, hf, model, ids, n_new, device, repeats=1)
        except Exception as exc:  # one engine failing (compile, OOM) is a result; the next row still runs
            record(STAGE, "headline", engine=engine, **base, error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        outputs[engine], totals[engine] = m["out"], m["total_s"]
        gbs = step_bytes / m["step_s"] / 1e9
        row = dict(engine=engine, **base, tokens_per_s=batch * n_new / m["total_s"], ms_per_token=m["step_s"] * 1e3,
                   first_call_s=m["cold_s"], step_gbs=gbs, roofline_frac=gbs / copy_gbs if copy_gbs else None,
                   seconds=round(time.perf_counter() - start, 1), graph=m.get("graph"))  # fmt: skip
        if engine != "hf-eager" and "hf-eager" in outputs:
            row.update(decode.compare_greedy(m["out"], outputs["hf-eager"], prompt_len, model))
            row["speedup_vs_hf_eager"] = totals["hf-eager"] / m["total_s"]
        if engine.startswith("fastgpt"):
            decode.add_predictions([row], model, batch, prompt_len + n_new / 2, copy_gbs, launch_us)
        record(STAGE, "headline", **row)
    decode._reset_engine_state(hf)
    del hf, model


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(1)
    copy_gbs = measure_copy_bandwidth_gbs(device) if on_gpu else None
    launch_us = perf_model.measure_launch_overhead_us(device)
    record(STAGE, "note", copy_bandwidth_gbs=copy_gbs, launch_overhead_us=launch_us)
    for model_name, batch, prompt_len, n_new in GPU_ROWS if on_gpu else CPU_ROWS:
        dtype = getattr(torch, decode.model_dtype(model_name, device))
        measure_row(model_name, batch, prompt_len, n_new, device, dtype, copy_gbs, launch_us)
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
