"""The headline stage of ``make gpu-check``: fastgpt against HF eager ``generate``, row by row.

``python -m benchmarks.headline``: fp16, 128-token prompt, 256 new tokens (the decode benchmark's
target rows), in order of value: gpt2 batch 1, gpt2-xl batch 1, gpt2 batch 64. Each engine's row
is recorded (``benchmarks.gpu_check.record``) as soon as it is measured, so a run cut short keeps
what it finished; the fastgpt row carries the greedy match against HF eager and the speed-up.
Measurement, byte counts and the comparison are the decode benchmark's (``benchmarks.decode``).

Without a GPU (the dry run) one tiny row on the CPU proves the plumbing.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks import decode
from benchmarks.common import measure_copy_bandwidth_gbs
from benchmarks.gpu_check_log import record

#: (model, batch, prompt_len, new_tokens), most valuable first.
GPU_ROWS = [("gpt2", 1, 128, 256), ("gpt2-xl", 1, 128, 256), ("gpt2", 64, 128, 256)]
CPU_ROWS = [("small-d256", 1, 8, 8)]
ENGINES = ("hf-eager", "fastgpt")
STAGE = "headline"


def measure_row(model_name: str, batch: int, prompt_len: int, n_new: int, device, dtype, copy_gbs) -> None:
    hf, model, source = decode.build_models(model_name, dtype, device)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    step_bytes = decode.step_bytes(model, batch, prompt_len + n_new / 2)
    base = dict(model=model_name, weights=source, dtype=str(dtype).replace("torch.", ""), batch=batch,
                prompt_len=prompt_len, new_tokens=n_new)  # fmt: skip
    outputs, totals = {}, {}
    for engine in ENGINES:  # one engine at a time, so each row is recorded as soon as it is measured
        decode._reset_engine_state(hf)
        start = time.perf_counter()
        try:
            m = decode.measure_config([engine], hf, model, ids, n_new, device, repeats=1)[engine]
            if "error" in m:
                raise RuntimeError(m["error"])
        except Exception as exc:  # one engine failing (compile, OOM) is a result; the next row still runs
            record(STAGE, "headline", engine=engine, **base, error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        total_s, step_s = m["times"][0], max(m["steps"][0], 1e-9)
        outputs[engine], totals[engine] = m["out"], total_s
        gbs = step_bytes / step_s / 1e9
        row = dict(engine=engine, **base, tokens_per_s=batch * n_new / total_s, ms_per_token=step_s * 1e3,
                   first_call_s=m["cold_s"], step_gbs=gbs, roofline_frac=gbs / copy_gbs if copy_gbs else None,
                   seconds=round(time.perf_counter() - start, 1),
                   graph=decode._graph_summary(m.get("warm")))  # fmt: skip
        if engine != "hf-eager" and "hf-eager" in outputs:
            row.update(decode.compare_greedy(m["out"], outputs["hf-eager"], prompt_len, model))
            row["speedup_vs_hf_eager"] = totals["hf-eager"] / total_s
        record(STAGE, "headline", **row)
    decode._reset_engine_state(hf)
    del hf, model


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.float16 if on_gpu else torch.float32
    if not on_gpu:
        torch.set_num_threads(1)
    copy_gbs = measure_copy_bandwidth_gbs(device) if on_gpu else None
    record(STAGE, "note", copy_bandwidth_gbs=copy_gbs)
    for model_name, batch, prompt_len, n_new in GPU_ROWS if on_gpu else CPU_ROWS:
        measure_row(model_name, batch, prompt_len, n_new, device, dtype, copy_gbs)
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
