"""Profile of one decode step: kernels per token, time per layer part, GPU idle share.

``python -m benchmarks.profile [--quick]``. On a GPU, for GPT-2-shaped models (fp16, random
weights, 128-token prompt; ``--quick``: gpt2 at batch 1), three ways of running the same warm
decode step:

* ``fastgpt``: Triton kernels, the step replayed as a CUDA graph (the default path);
* ``fastgpt-eager``: Triton kernels, launched one by one from Python;
* ``fastgpt-torch``: the PyTorch reference ops, launched one by one.

For each: the number of GPU kernels per token (memcpy/memset included), the GPU time per token
by layer part (``attention``: QKV projection + attention + output projection; ``mlp``; ``layernorm``:
LayerNorms that run as their own kernel -- one fused into a projection's prologue counts with that
projection; ``lm_head``: final LayerNorm + LM head; ``sampling``: logits processing and the
next-token choice; ``other``: embedding, EOS bookkeeping, the graph's token copy) and by op, the
costliest kernels, and the share of the step during which the GPU is idle:
``gpu_idle_frac = 1 - (kernel time per step) / (wall time per step)``, the wall time measured
with CUDA events over 30 steps *without* the profiler (``gpu_idle_frac_trace`` is the same from
the profiled trace, where the profiler's own overhead widens the gaps).

How kernels are attributed to parts: while profiling an eager step only, the model's kernel
boundary functions (``fastgpt.backend.attention``, ``ln_linear``, ``residual_linear``,
``add_layernorm``, ``select_next_token``, ``GPT.embed_parts``) are wrapped in
``record_function("fastgpt::<op>")`` ranges (nothing is wrapped otherwise: no cost in the hot
path); each kernel belongs to the innermost range its launch happened in. A graph replay has no
ranges, so its kernels get the parts of the eager step's kernels, aligned by name (the graph is
the same step, plus the copy of the chosen tokens). Kernels left over are classified by name.

Writes ``write_results("profile")`` (``profile_cpu`` without a GPU) with a ``summary`` (kernels
per token and GPU idle share of each run), and, without ``--quick``, a gzipped Chrome trace of
the graph run (``profile_trace.json.gz``) under ``$RESULTS_DIR``.

Without a GPU: a tiny model's eager step with the PyTorch backend on the CPU ("kernels" are then
the leaf aten ops that compute), so the script is testable anywhere; it says so.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import gzip
import os
import shutil
import tempfile
import time
from collections import defaultdict

import torch

from benchmarks.common import env_override, result_header, results_dir, write_results

PARTS = ("attention", "mlp", "layernorm", "lm_head", "sampling", "other")
OP_PART = {
    "qkv": "attention",
    "attention": "attention",
    "attn_proj": "attention",
    "fc": "mlp",
    "mlp_proj": "mlp",
    "layernorm": "layernorm",
    "lm_head": "lm_head",
    "sample": "sampling",
    "embed": "other",
}
#: Name fragments for kernels without an attributed range (lower case).
NAME_PARTS = (
    ("layernorm", ("layer_norm", "layernorm")),
    ("attention", ("attention", "_decode_split", "_decode_combine", "_prefill", "flash", "fmha", "sdpa")),
    ("sampling", ("sampl", "_chunk_kernel", "_row_kernel", "argmax", "exponential", "softmax", "topk", "sort")),
    ("mlp", ("gelu",)),
)
#: aten ops that only make views or allocate: not "kernels" in the CPU profile.
CPU_NON_COMPUTE = {
    "aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
    "aten::as_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::detach", "aten::unsqueeze",
    "aten::squeeze", "aten::select", "aten::slice", "aten::expand", "aten::t", "aten::transpose",
    "aten::permute", "aten::alias", "aten::unbind", "aten::split", "aten::lift_fresh", "aten::empty_like",
    "aten::_unsafe_view", "aten::numpy_T", "aten::contiguous", "aten::result_type", "aten::to", "aten::_to_copy",
}  # fmt: skip

CONFIGS_QUICK = [("gpt2", 1)]
CONFIGS_FULL = [("gpt2", 1), ("gpt2", 64), ("gpt2-xl", 1)]
RUNS = (  # name, FASTGPT_BACKEND, FASTGPT_CUDA_GRAPH
    ("fastgpt", None, None),
    ("fastgpt-eager", "triton", "0"),
    ("fastgpt-torch", "torch", "0"),
)




@contextlib.contextmanager
def op_ranges(model):
    """While active, the model's kernel-boundary functions run inside ``fastgpt::<op>`` ranges."""
    from fastgpt import backend as _backend

    patched = []

    def wrap(owner, name, op_of):
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def ranged(*args, **kwargs):
            with torch.profiler.record_function(f"fastgpt::{op_of(kwargs)}"):
                return original(*args, **kwargs)

        setattr(owner, name, ranged)
        patched.append((owner, name, original))

    wrap(_backend, "attention", lambda kw: "attention")
    wrap(_backend, "select_next_token", lambda kw: "sample")
    wrap(_backend, "add_layernorm", lambda kw: "layernorm")
    for name in ("ln_linear", "residual_linear", "linear"):
        wrap(_backend, name, lambda kw: kw.get("op", "linear"))
    for cls in type(model).__mro__:
        if "embed_parts" in cls.__dict__:
            wrap(cls, "embed_parts", lambda kw: "embed")
            break
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


# --------------------------------------------------------------------------------------------
# A warm decode session: a decoder after prefill, stepping on demand
# --------------------------------------------------------------------------------------------
class Session:
    def __init__(self, model, batch: int, prompt_len: int, max_new: int):
        from fastgpt.cuda_graph import GraphCache
        from fastgpt.decoder import Decoder
        from fastgpt.kv_cache import bucket_length
        from fastgpt.settings import GenerationSettings

        self.device = model.device
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=self.device)
        settings = GenerationSettings.create(model.config, prompt_len, max_new)
        cache_len = bucket_length(prompt_len + max_new, model.config.n_positions)  # as generate() sizes it
        with torch.inference_mode():
            self.graph, _ = GraphCache.graph_for(model, settings, batch, cache_len, None)
            self.decoder = self.graph.decoder if self.graph is not None else Decoder.create(model, settings, batch, cache_len)
            self.tokens = self.decoder.prefill(ids)
        self.step_fn = self.graph.step if self.graph is not None else self.decoder.step
        self.left = max_new - 1

    def run(self, n: int) -> None:
        if n > self.left:
            raise ValueError(f"session has {self.left} decode steps left, asked for {n}")
        self.left -= n
        with torch.inference_mode():
            for _ in range(n):
                self.tokens = self.step_fn(self.tokens)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wall_us_per_step(self, n: int) -> float:
        self.sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.run(n)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / n
        t0 = time.perf_counter()
        self.run(n)
        return (time.perf_counter() - t0) * 1e6 / n

    def profile(self, n: int):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sync()
        with torch.profiler.profile(activities=activities) as prof:
            self.run(n)
            self.sync()
        return prof

    def close(self) -> None:
        if self.graph is not None:
            self.graph.release()


# --------------------------------------------------------------------------------------------
# Reading the profile
# --------------------------------------------------------------------------------------------
def _range_op(event) -> str | None:
    node = event
    while node is not None:
        if node.name.startswith("fastgpt::"):
            return node.name[len("fastgpt::") :]
        node = node.cpu_parent
    return None


def _part(name: str, op: str | None) -> str:
    lower = name.lower()
    if "layer_norm" in lower or "layernorm" in lower:
        return "layernorm"
    if op is not None:
        return OP_PART.get(op, "other")
    for part, fragments in NAME_PARTS:
        if any(f in lower for f in fragments):
            return part
    return "other"


def device_kernels(prof) -> list[dict]:
    """GPU activities (kernels, memcpy, memset) in time order: name, start/end (us), and the op
    range their launch happened in (when the profile had ranges)."""
    from torch.autograd import DeviceType

    events = prof.events()
    # Kernels are attached to the innermost recorded CPU op of their launch; match them back to
    # the device events by (name, duration), which the profiler computes identically for both.
    launched = defaultdict(list)
    for e in events:
        if e.device_type == DeviceType.CPU and e.kernels:
            op = _range_op(e)
            for k in e.kernels:
                launched[(k.name, round(k.duration, 3))].append(op)
    out = []
    for e in sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start):
        start, end = e.time_range.start, e.time_range.end
        ops = launched.get((e.name, round(end - start, 3)))
        out.append(dict(name=e.name, start=start, end=end, op=ops.pop(0) if ops else None))
    return out


def cpu_kernels(prof) -> list[dict]:
    """CPU profile: the leaf aten ops that compute, in time order, with their op range."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not e.name.startswith("aten::") or e.name in CPU_NON_COMPUTE:
            continue
        if any(c.name.startswith("aten::") and c.name not in CPU_NON_COMPUTE for c in e.cpu_children):
            continue
        out.append(dict(name=e.name, start=e.time_range.start, end=e.time_range.end, op=_range_op(e)))
    out.sort(key=lambda k: k["start"])
    return out


def align_ops(kernels: list[dict], reference: list[dict]) -> None:
    """Give unattributed ``kernels`` the ops of ``reference`` kernels (one attributed step,
    repeated), matched by name in order."""
    if not reference or all(k["op"] is not None for k in kernels):
        return
    n_ref = len(reference)
    ref_names = [r["name"] for r in reference] * max(1, round(len(kernels) / n_ref))
    names = [k["name"] for k in kernels]
    matcher = difflib.SequenceMatcher(None, ref_names, names, autojunk=False)
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            k = kernels[block.b + i]
            if k["op"] is None:
                k["op"] = reference[(block.a + i) % n_ref]["op"]


def summarise(kernels: list[dict], n_steps: int, wall_us: float | None) -> dict:
    if not kernels:
        return dict(kernels_per_token=0.0, time_us_per_token=0.0, by_part={}, by_op={}, top_kernels=[])
    per_part = {p: dict(us=0.0, kernels=0.0) for p in PARTS}
    per_op: dict[str, dict] = defaultdict(lambda: dict(us=0.0, kernels=0.0))
    per_name: dict[str, dict] = {}
    for k in kernels:
        us = (k["end"] - k["start"]) / n_steps
        part = _part(k["name"], k["op"])
        per_part[part]["us"] += us
        per_part[part]["kernels"] += 1 / n_steps
        op = k["op"] or "unattributed"
        per_op[op]["us"] += us
        per_op[op]["kernels"] += 1 / n_steps
        entry = per_name.setdefault(k["name"], dict(name=k["name"][:120], part=part, us=0.0, count=0.0))
        entry["us"] += us
        entry["count"] += 1 / n_steps
    busy_total = sum(k["end"] - k["start"] for k in kernels) / n_steps
    # Union of the intervals over the profiled window (overlapping kernels counted once).
    busy_union, cur_start, cur_end = 0.0, None, None
    for k in kernels:
        if cur_end is None or k["start"] > cur_end:
            if cur_end is not None:
                busy_union += cur_end - cur_start
            cur_start, cur_end = k["start"], k["end"]
        else:
            cur_end = max(cur_end, k["end"])
    busy_union += cur_end - cur_start
    window = kernels[-1]["end"] - kernels[0]["start"]
    result = dict(
        kernels_per_token=len(kernels) / n_steps,
        time_us_per_token=busy_total,
        wall_us_per_token=wall_us,
        gpu_idle_frac=None if wall_us is None else max(0.0, 1.0 - (busy_union / n_steps) / wall_us),
        gpu_idle_frac_trace=max(0.0, 1.0 - busy_union / window) if window > 0 else None,
        by_part={p: dict(us=round(v["us"], 3), kernels=round(v["kernels"], 2)) for p, v in per_part.items()},
        by_op={o: dict(us=round(v["us"], 3), kernels=round(v["kernels"], 2)) for o, v in sorted(per_op.items())},
        top_kernels=sorted(per_name.values(), key=lambda e: -e["us"])[:15],
    )
    return result


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def profile_run(model, batch, prompt_len, *, n_warm, n_wall, n_prof, reference=None, trace_path=None) -> tuple[dict, list]:
    """Profile the current environment's decode step; returns (summary, attributed reference step)."""
    on_gpu = model.device.type == "cuda"
    total = n_warm + n_wall + n_prof + 2
    session = Session(model, batch, prompt_len, total)
    try:
        session.run(n_warm)
        wall = session.wall_us_per_step(n_wall)
        path = "graph" if session.graph is not None else "eager"
        if on_gpu and session.graph is None:
            # Attribution: one eager step inside the op ranges (not timed).
            with op_ranges(model):
                ranged = device_kernels(session.profile(1))
            reference = ranged
        if on_gpu:
            prof = session.profile(n_prof)
            kernels = device_kernels(prof)
            align_ops(kernels, reference or [])
        else:
            with op_ranges(model):
                prof = session.profile(n_prof)
            kernels = cpu_kernels(prof)
            wall = None  # CPU op times include the profiler's overhead: no idle share
        if trace_path is not None:
            tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
            tmp.close()
            prof.export_chrome_trace(tmp.name)
            with open(tmp.name, "rb") as src, gzip.open(trace_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(tmp.name)
        summary = summarise(kernels, n_prof, wall if on_gpu else None)
        summary["path"] = path
        return summary, reference
    finally:
        session.close()


def build_model(name: str, dtype: torch.dtype, device: torch.device):
    from fastgpt import GPT, GPTConfig

    if name == "tiny":
        config = GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_head=2, n_layer=2)
    else:
        config = GPTConfig.from_preset(name)
    return GPT.from_config(config, dtype=dtype, device=device, seed=0)


def run_profiles(args) -> dict:
    from fastgpt.cuda_graph import clear_graph_cache

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    rows = []
    if not on_gpu:
        print("No GPU: profiling a tiny model's eager step with the PyTorch backend on the CPU.")
        configs, runs = [("tiny", 1)], [("fastgpt-torch", "torch", "0")]
        steps = dict(n_warm=1, n_wall=2, n_prof=3)
    else:
        configs, runs = (CONFIGS_QUICK if args.quick else CONFIGS_FULL), RUNS
        steps = dict(n_warm=3, n_wall=30, n_prof=5 if args.quick else 10)
    for model_name, batch in configs:
        model = build_model(model_name, dtype, device)
        reference = None
        # Eager Triton first: its attributed step is the graph run's reference.
        for run_name, backend, graph in sorted(runs, key=lambda r: r[0] != "fastgpt-eager"):
            clear_graph_cache()
            trace = None
            if on_gpu and not args.quick and run_name == "fastgpt" and (model_name, batch) == configs[0]:
                trace = results_dir() / "profile_trace.json.gz"
            with env_override(FASTGPT_BACKEND=backend, FASTGPT_CUDA_GRAPH=graph):
                try:
                    summary, ref = profile_run(
                        model, batch, args.prompt_len,
                        reference=reference if run_name == "fastgpt" else None, trace_path=trace, **steps,
                    )  # fmt: skip
                except Exception as exc:  # report, do not crash the suite
                    rows.append(dict(run=run_name, model=model_name, batch=batch, error=f"{type(exc).__name__}: {exc}"[:300]))
                    continue
            if run_name == "fastgpt-eager":
                reference = ref
            row = dict(run=run_name, model=model_name, batch=batch, prompt_len=args.prompt_len, dtype=args.dtype, **summary)
            if trace is not None:
                row["trace"] = str(trace)
            rows.append(row)
        del model
        clear_graph_cache()
        if on_gpu:
            torch.cuda.empty_cache()
    summary = []
    for r in rows:
        if "error" in r:
            continue
        tag = f"profile {r['model']} b{r['batch']} {r['run']}"
        kernels = float(r["kernels_per_token"])
        summary.append(dict(metric=f"{tag} kernels/token ({r['path']})", value=kernels, target="report", met=None))
        if r.get("gpu_idle_frac") is not None:
            summary.append(dict(metric=f"{tag} GPU idle share", value=float(r["gpu_idle_frac"]), target="report", met=None))
    return dict(result_header(device), rows=rows, summary=summary)


def print_report(result: dict) -> None:
    print(f"\n{result['device']}  commit {result['commit']}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['run']:<15}{r['model']:<9}b{r['batch']:<4} error: {r['error'][:100]}")
            continue
        idle = f"{100 * r['gpu_idle_frac']:.1f}%" if r.get("gpu_idle_frac") is not None else "-"
        wall = f"{r['wall_us_per_token']:.1f}" if r.get("wall_us_per_token") else "-"
        print(
            f"\n{r['run']} ({r['path']})  {r['model']} b{r['batch']}: {r['kernels_per_token']:.1f} kernels/token, "
            f"kernel time {r['time_us_per_token']:.1f} us/token, wall {wall} us/token, GPU idle {idle}"
        )
        for part, v in r["by_part"].items():
            if v["kernels"]:
                print(f"    {part:<10}{v['kernels']:>7.1f} kernels {v['us']:>10.1f} us")
        for k in r["top_kernels"][:6]:
            print(f"      {k['us']:>9.1f} us  x{k['count']:<5.1f} {k['part']:<10} {k['name'][:70]}")


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default="float16" if on_gpu else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=128 if on_gpu else 8)
    p.add_argument("--quick", action="store_true", help="gpt2 batch 1 only, no trace file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_profiles(args)
    print_report(result)
    write_results("profile" if args.device.startswith("cuda") else "profile_cpu", result)
    return result


if __name__ == "__main__":
    main()
