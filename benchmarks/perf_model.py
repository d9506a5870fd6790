"""The decode step's performance model: bytes over bandwidth plus launches times launch cost.

At small batch a decode step is a chain of dependent kernels that together read every weight
once. Its time is modelled as::

    step_s = bytes_per_token / (EFFICIENCY * copy_bandwidth) + launches_per_token * launch_overhead

and ``predicted_tokens_per_s = batch / step_s`` (one new token for each of the ``batch`` rows per
step; the prefill is not modelled, so compare with ``1000 * batch / ms_per_token``, or
``predicted_ms_per_token`` with ``ms_per_token``). A measured step far above the prediction is
lost elsewhere (host gaps, slow kernels); the two terms say whether the loss is bandwidth or
launches.

* ``bytes_per_token`` (:func:`bytes_per_token`): per step, every weight once, the live K and V of
  every layer at the mean context, and the new K and V written. Tables that are only gathered
  count the ``batch`` rows read (:func:`weight_bytes`): GPT-2's position table, and the token
  embedding when the LM head has its own weight (untied); a tied embedding IS the LM head's
  matrix, read whole once. The LLaMA family has no position table (rotary positions), three
  MLP matrices (gate, up, down) and K and V of ``n_kv_head`` heads of ``head_dim``
  (:func:`kv_slot_bytes`): grouped-query attention divides the cache traffic by the group size.
* ``launches_per_token``: kernels launched by one decode step, from the launch counter
  ``count_decode_launches(model, batch)`` (``benchmarks/launch_count.py`` or
  ``fastgpt/launch_count.py``); None while no counter exists.
* ``copy_bandwidth``: a large device copy (bytes read + written per second), measured in the same
  run (``benchmarks.common.measure_copy_bandwidth_gbs``).
* ``launch_overhead_us`` (:func:`measure_launch_overhead_us`): the cost of one more kernel in a
  CUDA graph, measured in the same run from graphs of ``N`` and ``2N`` dependent 1-element
  kernels; None on a CPU.

``python -m benchmarks.perf_model --table [--out FILE]``: the issue-14 predictions for gpt2 and
gpt2-xl (fp16, batch 1, 128-token prompt + 256 new tokens) at 1, 2 and 4 us per launch, with the
launch counts before (87 and 303) and after (64 and 244) the launch cuts, and issue 15's target
row, Llama-3.2-1B (bf16, same shape; 2.47 GB of weights) at its launch budget (5 per layer + 4
outside: 84), at H200 (4.3 TB/s) and H100 (3.0 TB/s) copy bandwidth. ``roofline_frac`` is the
predicted step's bandwidth over the copy bandwidth (the benchmarks' roofline %): issue 15 asks
>= 0.75 for Llama-3.2-1B on an H200, about 1,300 tok/s.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastgpt import GPT, GPTConfig

#: Fraction of the copy bandwidth a decode step's reads reach at best.
EFFICIENCY = 0.8
#: Copy bandwidth in GB/s (bytes read + written) of the devices the closing note is about.
DEVICE_BANDWIDTH_GBS = {"H200": 4300.0, "H100": 3000.0}
#: Kernel launches per decode token, counted before and targeted after issue 14's launch cuts;
#: for the LLaMA family the budget of issue 15 (GPT-2's 5 per layer + 4 outside).
LAUNCHES = {
    "gpt2": {"before": 87, "after": 64},
    "gpt2-xl": {"before": 303, "after": 244},
    "llama-3.2-1b": {"budget": 16 * 5 + 4},
}
#: The table's dtype per model (all 2 bytes): GPT-2 as issue 14 measured it, the LLaMA family in
#: bf16 (their released dtype, issue 15's target).
TABLE_DTYPES = {"gpt2": "float16", "gpt2-xl": "float16", "llama-3.2-1b": "bfloat16"}
LAUNCH_OVERHEADS_US = (1.0, 2.0, 4.0)
#: The benchmark's target rows: 128-token prompt, 256 new tokens, batch 1, fp16.
TABLE_SHAPE = dict(batch=1, prompt_len=128, new_tokens=256, itemsize=2)


# --------------------------------------------------------------------------------------------
# The model's arithmetic
# --------------------------------------------------------------------------------------------
def n_parameters(config: GPTConfig) -> int:
    """Distinct parameters of a fastgpt GPT of this configuration (built on the meta device:
    nothing is allocated), tied embeddings counted once."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameters())


def kv_slot_bytes(config: GPTConfig, batch: int, itemsize: int) -> int:
    """Bytes of the K and V of one cache slot, every layer and row: ``n_kv_head * head_dim``
    values each (GPT-2: ``n_embd``)."""
    return 2 * config.n_layer * batch * config.kv_heads * config.head_dim * itemsize


def weight_bytes(config: GPTConfig, batch: int, itemsize: int, n_params: int | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the tables that are
    only gathered, of which the ``batch`` rows used: GPT-2's position table, and the token
    embedding when the LM head is untied (tied, it is the LM head's matrix and read whole).
    ``n_params``: the model's own count (default :func:`n_parameters` of ``config``)."""
    n = n_parameters(config) if n_params is None else n_params
    gathered = 0 if config.is_llama else 1  # GPT-2's position table
    if not config.tie_word_embeddings:
        gathered += 1  # the token embedding: the head has its own matrix
    tables = (config.n_positions if not config.is_llama else 0) * config.n_embd
    if not config.tie_word_embeddings:
        tables += config.vocab_size * config.n_embd
    return (n - tables + gathered * batch * config.n_embd) * itemsize


def bytes_per_token(config: GPTConfig, batch: int, context: float, itemsize: int) -> float:
    """Bytes one decode step moves: the weights read (:func:`weight_bytes`), the K and V of
    ``context`` slots of every layer read, one new K and V written (:func:`kv_slot_bytes`)."""
    kv_row = kv_slot_bytes(config, batch, itemsize)
    return weight_bytes(config, batch, itemsize) + kv_row * context + kv_row


def predict_step_s(
    n_bytes: float, launches: int, bandwidth_gbs: float, launch_overhead_us: float, efficiency: float = EFFICIENCY
) -> float:
    """Seconds of one decode step: ``n_bytes / (efficiency * bandwidth) + launches * overhead``."""
    if bandwidth_gbs <= 0 or not 0 < efficiency <= 1:
        raise ValueError(f"bandwidth_gbs must be > 0 and efficiency in (0, 1], got {bandwidth_gbs}, {efficiency}")
    if launches < 0 or launch_overhead_us < 0:
        raise ValueError(f"launches and launch_overhead_us must be >= 0, got {launches}, {launch_overhead_us}")
    return n_bytes / (efficiency * bandwidth_gbs * 1e9) + launches * launch_overhead_us * 1e-6


def predict_tokens_per_s(n_bytes: float, launches: int, bandwidth_gbs: float, launch_overhead_us: float,
                         batch: int = 1, efficiency: float = EFFICIENCY) -> float:  # fmt: skip
    """New tokens per second of the decode loop: ``batch`` tokens per :func:`predict_step_s`."""
    return batch / predict_step_s(n_bytes, launches, bandwidth_gbs, launch_overhead_us, efficiency)


# --------------------------------------------------------------------------------------------
# Measured inputs
# --------------------------------------------------------------------------------------------
def measure_launch_overhead_us(device: torch.device | str, n_launches: int = 500) -> float | None:
    """Microseconds one more kernel costs inside a CUDA graph; None off CUDA.

    Two graphs of ``n_launches`` and ``2 * n_launches`` dependent 1-element kernels (each adds
    to the same scalar, so each waits for the one before, like a decode step's chain): the
    difference of their replay times over ``n_launches`` removes the graph launch's fixed cost.
    """
    from benchmarks.common import time_gpu

    device = torch.device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        scalar = torch.zeros(1, device=device)

        def chain(n: int):
            def run() -> None:
                for _ in range(n):
                    scalar.add_(1.0)

            return run

        short = time_gpu(chain(n_launches), flush_l2=False, graph=True)
        long = time_gpu(chain(2 * n_launches), flush_l2=False, graph=True)
    if short is None or long is None:
        return None
    return max(long - short, 0.0) / n_launches


def count_launches(model, batch: int) -> tuple[int | None, str | None]:
    """``(launches of one decode step, None)`` or ``(None, why not)``; run it under the engine's
    environment (backend, graph, PDL), which decides the kernels. On a GPU the kernels run (the
    autotuners need real launches); elsewhere only their launchers do (the count is the same)."""
    from benchmarks.launch_count import count_decode_launches

    try:
        counted = count_decode_launches(model, batch=batch, run_kernels=model.device.type == "cuda")
    except Exception as exc:  # a benchmark records why, and goes on measuring
        return None, f"{type(exc).__name__}: {exc}"[:300]
    return int(counted["launches_per_token"]), None


def prediction_fields(model, batch: int, context: float, copy_bandwidth_gbs: float | None,
                      launch_overhead_us: float | None, launches: int | None) -> dict:  # fmt: skip
    """The model's fields of one benchmark row; ``predicted_*`` are None unless every input was
    measured (the bandwidth, the launch overhead and the launch count)."""
    n_bytes = bytes_per_token(model.config, batch, context, model.dtype.itemsize)
    fields = dict(bytes_per_token=n_bytes, launches_per_token=launches, launch_overhead_us=launch_overhead_us,
                  predicted_tokens_per_s=None, predicted_ms_per_token=None)  # fmt: skip
    if copy_bandwidth_gbs and launch_overhead_us is not None and launches is not None:
        step_s = predict_step_s(n_bytes, launches, copy_bandwidth_gbs, launch_overhead_us)
        fields.update(predicted_tokens_per_s=batch / step_s, predicted_ms_per_token=step_s * 1e3)
    return fields


# --------------------------------------------------------------------------------------------
# The closing note's table
# --------------------------------------------------------------------------------------------
def prediction_table() -> dict:
    """Predicted tok/s for gpt2, gpt2-xl and llama-3.2-1b, every device, launch overhead and
    launch count (:data:`LAUNCHES`); ``roofline_frac``: the predicted step's bytes per second over
    the copy bandwidth."""
    shape = TABLE_SHAPE
    context = shape["prompt_len"] + shape["new_tokens"] / 2
    rows = []
    for name, counts in LAUNCHES.items():
        n_bytes = bytes_per_token(GPTConfig.from_preset(name), shape["batch"], context, shape["itemsize"])
        for device, bandwidth in DEVICE_BANDWIDTH_GBS.items():
            floor = predict_tokens_per_s(n_bytes, 0, bandwidth, 0.0, shape["batch"])
            for when, launches in counts.items():
                for overhead in LAUNCH_OVERHEADS_US:
                    rows.append(dict(
                        model=name, dtype=TABLE_DTYPES[name], device=device, copy_bandwidth_gbs=bandwidth,
                        launches=when, launches_per_token=launches, launch_overhead_us=overhead,
                        bytes_per_token=n_bytes,
                        predicted_tokens_per_s=predict_tokens_per_s(n_bytes, launches, bandwidth, overhead, shape["batch"]),
                        bandwidth_only_tokens_per_s=floor,
                    ))  # fmt: skip
    for row in rows:
        row["fraction_of_bandwidth_only"] = row["predicted_tokens_per_s"] / row["bandwidth_only_tokens_per_s"]
        step_gbs = row["bytes_per_token"] * row["predicted_tokens_per_s"] / shape["batch"] / 1e9
        row["roofline_frac"] = step_gbs / row["copy_bandwidth_gbs"]
    formula = "tok/s = batch / (bytes_per_token / (efficiency * copy_bandwidth) + launches_per_token * launch_overhead)"
    return dict(formula=formula, efficiency=EFFICIENCY, dtype=dict(TABLE_DTYPES), mean_context=context, **shape,
                rows=rows)  # fmt: skip


def format_table(table: dict) -> str:
    """The table as Markdown: one line per model, device and launch count; one column per overhead."""
    head = "| model | device | launches/token | " + " | ".join(f"{u:g} us/launch" for u in LAUNCH_OVERHEADS_US)
    lines = [head + " | bandwidth only |", "|" + "---|" * (4 + len(LAUNCH_OVERHEADS_US))]
    # A cell: predicted tok/s (roofline %).
    groups: dict[tuple, list[dict]] = {}
    for row in table["rows"]:
        groups.setdefault((row["model"], row["device"], row["launches"], row["launches_per_token"]), []).append(row)
    for (model, device, when, launches), rows in groups.items():
        cells = " | ".join(f"{r['predicted_tokens_per_s']:,.0f} ({100 * r['roofline_frac']:.0f}%)" for r in rows)
        lines.append(f"| {model} | {device} | {launches} ({when}) | {cells} | {rows[0]['bandwidth_only_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="print the prediction table (issue 14, and issue 15's Llama-3.2-1B row)")
    p.add_argument("--out", default=None, help="also write the table as JSON to this file")
    args = p.parse_args(argv)
    if not args.table:
        p.error("nothing to do: pass --table")
    table = prediction_table()
    dtypes = ", ".join(f"{model} {dtype}" for model, dtype in table["dtype"].items())
    print(f"{table['formula']}; efficiency {EFFICIENCY}, {dtypes}, batch 1, mean context {table['mean_context']:g}; "
          "cells: tok/s (roofline %)")  # fmt: skip
    print(format_table(table))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
