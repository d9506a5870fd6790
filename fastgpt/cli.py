"""Command line: ``python -m fastgpt generate`` (also installed as the ``fastgpt`` script).

Takes a text prompt when a GPT-2 tokenizer is on disk (``transformers`` + a local checkpoint
directory or HF cache), or token ids with ``--ids 464,2068,318``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import PRESETS
from .loading import resolve_dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description="GPT-2 inference at the memory-bandwidth limit")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens after a prompt")
    g.add_argument("prompt", nargs="?", help="text prompt (needs a tokenizer on disk); or use --ids")
    g.add_argument("--ids", help="comma-separated prompt token ids, e.g. 464,2068,318")
    g.add_argument("--model", default="gpt2", help=f"preset ({', '.join(PRESETS)}) or a checkpoint directory")
    g.add_argument("--random-init", action="store_true", help="random weights of the preset's shape (no checkpoint)")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0 or unset: greedy)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32)")
    return parser


def _load_tokenizer(model_arg: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_arg, local_files_only=True)
    except Exception:
        return None


def _run_generate(args: argparse.Namespace) -> int:
    from .model import GPT

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.random_init:
        if args.model not in PRESETS:
            raise SystemExit(f"fastgpt: --random-init needs a preset ({', '.join(PRESETS)}), got {args.model!r}")
        model = GPT.from_config(args.model, dtype=dtype, device=device)
    else:
        try:
            model = GPT.from_pretrained(args.model, dtype=dtype, device=device)
        except FileNotFoundError as exc:
            raise SystemExit(f"fastgpt: {exc}") from None

    tokenizer = None if args.ids else _load_tokenizer(args.model)
    if args.ids:
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"fastgpt: --ids must be comma-separated integers, got {args.ids!r}") from None
    elif args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(
                "fastgpt: no tokenizer on disk for this model; pass token ids with --ids 464,2068,318 "
                "or a checkpoint directory that includes the tokenizer files"
            )
        ids = tokenizer.encode(args.prompt)
    else:
        raise SystemExit("fastgpt: give a text prompt or --ids")

    do_sample = args.temperature is not None and args.temperature > 0
    input_ids = torch.tensor([ids], dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        args.max_new_tokens,
        do_sample=do_sample,
        temperature=args.temperature if do_sample else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = out[0, len(ids) :].tolist()
    if tokenizer is not None:
        print(tokenizer.decode(out[0].tolist()))
    else:
        print(",".join(str(t) for t in out[0].tolist()))
    print(f"[{len(new)} new tokens in {elapsed:.3f} s, {len(new) / elapsed:.1f} tok/s, {device}, {dtype}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _run_generate(args)
    except ValueError as exc:
        raise SystemExit(f"fastgpt: {exc}") from None
    return 1


if __name__ == "__main__":
    sys.exit(main())
