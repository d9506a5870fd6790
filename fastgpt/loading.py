"""Loading GPT-2 weights: from a transformers model, a local directory, or the local HF cache.

Never touches the network. Hugging Face GPT-2 checkpoints name tensors ``transformer.h.0.attn.c_attn.weight``
and store the four projection weights (``c_attn``, ``attn.c_proj``, ``c_fc``, ``mlp.c_proj``) as
Conv1D, i.e. transposed relative to ``nn.Linear``; both are handled here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import GPTConfig

if TYPE_CHECKING:
    from .model import GPT

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: Weights stored as Conv1D (in, out) in HF checkpoints: transposed into nn.Linear (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32/float16/bfloat16`` or one of their names."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")


def convert_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a GPT2LMHeadModel state dict onto fastgpt's names, transposing Conv1D weights.

    Raises ValueError naming the tensor when a weight is missing or its shape does not fit ``config``.
    """
    from .model import GPT

    with torch.device("meta"):
        expected = GPT(config).state_dict()
    out = {}
    for name, want in expected.items():
        hf_name = name if name.startswith("lm_head") else f"transformer.{name}"
        tensor = hf_state.get(hf_name, hf_state.get(name))
        if tensor is None:
            raise ValueError(f"checkpoint is missing the weight {hf_name!r}")
        if name.endswith(_CONV1D_SUFFIXES) and tensor.dim() == 2:
            # Contiguous (out, in) rows: the GEMV kernels stream each weight row along K.
            tensor = tensor.t().contiguous()
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(
                f"weight {hf_name!r} has shape {tuple(tensor.shape)} but the config {config} needs {tuple(want.shape)} "
                "(after the Conv1D transpose)"
            )
        out[name] = tensor
    return out


def _build(config: GPTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device) -> "GPT":
    from .model import GPT

    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(convert_hf_state_dict(state, config), assign=True, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def model_from_hf(hf_model, *, dtype: torch.dtype | str | None = None, device=None) -> "GPT":
    """A fastgpt GPT with the weights of a ``transformers.GPT2LMHeadModel`` (copied once)."""
    config = GPTConfig.from_hf(hf_model.config)
    first = next(hf_model.parameters())
    dtype = resolve_dtype(dtype) if dtype is not None else first.dtype
    device = torch.device(device) if device is not None else first.device
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    return _build(config, state, resolve_dtype(dtype), device)


def hf_cache_dirs() -> list[Path]:
    """Where a Hugging Face hub cache may be on this machine, in the order HF itself looks."""
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def find_checkpoint(name_or_path: str) -> Path:
    """The directory holding ``config.json`` and the weights for a path or a hub name (local only)."""
    looked = []
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        looked.append(str(path))
    else:
        looked.append(str(path))
    repo_dir_name = "models--" + name_or_path.replace("/", "--")
    for cache in hf_cache_dirs():
        snapshots = cache / repo_dir_name / "snapshots"
        looked.append(str(snapshots))
        if snapshots.is_dir():
            for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if (snap / "config.json").is_file() and _weight_file(snap) is not None:
                    return snap
    raise FileNotFoundError(
        f"no weights for {name_or_path!r} on disk (fastgpt never downloads). Looked in: {', '.join(looked)}. "
        "Pass a directory holding config.json and model.safetensors (sharded or not, or pytorch_model.bin), e.g. one written by "
        "transformers' save_pretrained, or use random weights: GPT.from_config('gpt2') / the CLI's --random-init."
    )


def _weight_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_pretrained(name_or_path: str, *, dtype: torch.dtype | str = torch.float32, device="cpu") -> "GPT":
    """Load a GPT-2 checkpoint from a local directory or the local HF cache (safetensors first)."""
    dtype = resolve_dtype(dtype)
    directory = find_checkpoint(name_or_path)
    weights = _weight_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory} has config.json but neither model.safetensors nor pytorch_model.bin")
    hf_config = json.loads((directory / "config.json").read_text())
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{directory} holds a {model_type!r} model; fastgpt loads GPT-2 checkpoints (model_type 'gpt2')")
    config = GPTConfig(
        vocab_size=hf_config["vocab_size"],
        n_positions=hf_config.get("n_positions", 1024),
        n_embd=hf_config["n_embd"],
        n_head=hf_config["n_head"],
        n_layer=hf_config["n_layer"],
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
        activation=hf_config.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", True),
    )
    if weights.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif weights.name.endswith(".index.json"):
        from safetensors.torch import load_file

        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return _build(config, state, dtype, device)
