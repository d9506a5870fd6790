"""Command line: ``python -m fastgpt generate`` (also installed as the ``fastgpt`` script).

Takes a text prompt when a tokenizer is on disk (a checkpoint directory written by
``save_pretrained`` with its tokenizer files, or the local HF cache), or token ids with
``--ids 464,2068,318``. Text streams to stdout token by token; ids are printed as they come.

Every failure a user can cause -- a bad flag value, a missing or corrupt checkpoint, a device
that is not there, an error from ``generate()`` -- ends as ONE line ``fastgpt: ...`` on stderr and
a non-zero exit status, never a traceback (``FASTGPT_DEBUG=1`` shows the traceback).

Sampling: ``--temperature T > 0`` samples; ``--top-k``, ``--top-p``, ``--min-p`` or ``--seed``
without ``--temperature`` sample at temperature 1 (they only mean something when sampling);
no sampling flag, or ``--temperature 0``, decodes greedily (``--temperature 0`` with a sampling
filter is refused). Generation stops at the tokenizer's or the checkpoint's EOS token unless
``--ignore-eos``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from .config import PRESETS

#: Files of which at least one makes a directory hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
#: The largest seed: generate() keeps it in an int64 tensor.
MAX_SEED = 2**63 - 1


class CliError(Exception):
    """A problem with what the user asked for; printed as one ``fastgpt: ...`` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, exit status 2
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)  # our type checks name the flag already
        self.exit(2, f"fastgpt: {message} (see `{self.prog} --help`)\n")


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2**63 - 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgpt", description="GPT-2 and LLaMA-family (Llama, Qwen2, Mistral) inference at the memory-bandwidth limit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate tokens after a prompt")
    g.add_argument("prompt", nargs="?", help="text prompt (needs a tokenizer on disk); or use --ids")
    g.add_argument("--ids", help="comma-separated prompt token ids, e.g. 464,2068,318")
    g.add_argument("--model", default="gpt2", help=f"a checkpoint directory, a model in the local HF cache, or with --random-init a preset "
                   f"({', '.join(PRESETS)}); default gpt2")
    g.add_argument("--random-init", action="store_true", help="random weights of the preset's shape (no checkpoint)")
    g.add_argument("--max-new-tokens", type=_int_at_least(1, "--max-new-tokens"), default=50,
                   help="tokens to generate, >= 1 (default 50; fewer when the EOS comes first)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature > 0; 0 means greedy (default: greedy, or 1 with a sampling flag)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (implies sampling)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling in (0, 1] (implies sampling)")
    g.add_argument("--min-p", type=float, default=None, help="min-p sampling in [0, 1] (implies sampling)")
    g.add_argument("--seed", type=_seed, default=None, help="makes sampling reproducible (implies sampling)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32)")  # fmt: skip
    return parser


# ---- checking what was asked, before anything slow -------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def sampling_settings(args: argparse.Namespace) -> dict:
    """The sampling keywords for ``generate()``: greedy, or sampling when asked for (see module doc)."""
    filters = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p),
                                        ("--seed", args.seed)) if value is not None]  # fmt: skip
    temperature = args.temperature
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise CliError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if temperature == 0:
        if filters:
            raise CliError(f"--temperature 0 means greedy decoding, which {' and '.join(filters)} cannot change; "
                           "drop it, or give a temperature > 0 to sample")  # fmt: skip
        return {"do_sample": False}
    if temperature is None and not filters:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 1.0 if temperature is None else temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed}  # fmt: skip


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CliError("--ids must hold at least one token id")
    return ids


def load_tokenizer(model_arg: str | Path):
    """The tokenizer in a checkpoint directory (or of a cached hub name), or CliError saying what
    is missing. Runs before the model is built: a missing tokenizer fails fast."""
    directory = Path(model_arg).expanduser()
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so a text prompt cannot be "
            "encoded: save the tokenizer there too (tokenizer.save_pretrained(directory)), or pass token ids "
            "with --ids 464,2068,318"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CliError("a text prompt needs transformers for the tokenizer (pip install 'fastgpt[hf]'), "
                       "or pass token ids with --ids 464,2068,318") from None  # fmt: skip
    try:
        return AutoTokenizer.from_pretrained(str(directory) if directory.is_dir() else model_arg, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CliError(
            f"no tokenizer on disk for {str(model_arg)!r} (fastgpt never downloads): {str(exc).splitlines()[0]}. "
            "Pass a checkpoint directory that includes the tokenizer files, or token ids with --ids 464,2068,318"
        ) from None


def checkpoint_eos_token_id(directory: Path) -> int | list[int] | None:
    """The EOS id(s) a checkpoint declares (generation_config.json, then config.json), or None."""
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            return eos
    return None


# ---- output ----------------------------------------------------------------------------------
class _PrintStream:
    """A ``generate()`` streamer (HF's ``put`` / ``end``) that writes each token as it comes:
    decoded text when there is a tokenizer, else comma-separated ids (one row: the CLI's batch)."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def put(self, value: torch.Tensor) -> None:
        new = value.reshape(-1).tolist()  # the prompt (1, T) first, then one (1,) token per step
        if self.tokenizer is None:
            self.out.write(("," if self.tokens else "") + ",".join(map(str, new)))
            self.tokens += new
        else:
            self.tokens += new
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a character whose UTF-8 bytes are not all here yet
                self.out.write(text[len(self.printed) :])
                self.printed = text
        self.out.flush()

    def end(self) -> None:
        if self.tokenizer is not None:
            self.out.write(self.tokenizer.decode(self.tokens, skip_special_tokens=True)[len(self.printed) :])
        self.out.write("\n")
        self.out.flush()


# ---- the command -----------------------------------------------------------------------------
def _run_generate(args: argparse.Namespace) -> int:
    from .loading import find_checkpoint, resolve_dtype
    from .model import GPT

    # Everything that can be checked without the weights is checked first.
    sampling = sampling_settings(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.random_init and args.model not in PRESETS:
        raise CliError(f"--random-init needs a preset ({', '.join(PRESETS)}), got {args.model!r}")
    checkpoint = None if args.random_init else find_checkpoint(args.model)  # a missing one is named first
    if args.ids is not None:
        ids, tokenizer = parse_ids(args.ids), None
    elif args.prompt is not None:
        tokenizer = load_tokenizer(checkpoint or args.model)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise CliError("the prompt encodes to no tokens; give a non-empty prompt")
    else:
        raise CliError("give a text prompt or --ids")
    eos = None
    if not args.ignore_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None and checkpoint is not None:
            eos = checkpoint_eos_token_id(checkpoint)

    if args.random_init:
        model = GPT.from_config(args.model, dtype=dtype, device=device)
    else:
        model = GPT.from_pretrained(str(checkpoint), dtype=dtype, device=device)
    vocab = model.config.vocab_size
    if not all(0 <= t < vocab for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise CliError(f"the prompt's token id {bad} is outside this model's vocabulary [0, {vocab - 1}]")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    start = time.perf_counter()
    out = model.generate(input_ids, args.max_new_tokens, eos_token_id=eos, streamer=_PrintStream(tokenizer), **sampling)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_new = out.shape[1] - len(ids)
    print(f"[{n_new} new tokens in {elapsed:.3f} s, {n_new / elapsed:.1f} tok/s, {device}, {dtype}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _run_generate(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as exc:
        if os.environ.get("FASTGPT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"fastgpt: {message}") from None
    return 1


if __name__ == "__main__":
    sys.exit(main())
