"""Reading weights: from a transformers model, a local directory, or the local HF cache.

Never touches the network, and never imports the model (``fastgpt.model`` imports this module;
it builds the GPT from what is read here). Hugging Face GPT-2 checkpoints name tensors
``transformer.h.0.attn.c_attn.weight`` and store the four projection weights (``c_attn``,
``attn.c_proj``, ``c_fc``, ``mlp.c_proj``) as Conv1D, i.e. transposed relative to ``nn.Linear``.
LLaMA-family checkpoints (``model.layers.0.self_attn.q_proj.weight``, ...) keep separate Q/K/V
and gate/up projections, which fastgpt fuses (see ``fastgpt.model``).
:func:`convert_hf_state_dict` maps all of them. Every error about a file names the file and what
is wrong with it (a ``ValueError``, or ``FileNotFoundError`` for what is missing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from .config import GPTConfig

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
#: Weight files in the order they are preferred.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: A Hugging Face hub name: "gpt2" or "owner/name", nothing path-like.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32/float16/bfloat16`` or one of their names."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")


def convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict onto fastgpt's names: GPT-2's with its Conv1D weights
    transposed, the LLaMA family's with Q/K/V stacked and gate/up interleaved.

    ``expected`` is the fastgpt model's own state dict (meta tensors do: only names and shapes
    are read). Raises ValueError naming the tensor when a weight is missing or its shape does not
    fit ``config``.
    """
    if config.is_llama:
        return _convert_llama_family(hf_state, expected, config)
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


#: fastgpt's name suffix -> the LLaMA-family tensors it is built from (``{}``: the layer index).
_LLAMA_LAYER = {
    "ln_1.weight": ("model.layers.{}.input_layernorm.weight",),
    "ln_2.weight": ("model.layers.{}.post_attention_layernorm.weight",),
    "attn.c_attn.weight": tuple(f"model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv"),
    "attn.c_attn.bias": tuple(f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"),
    "attn.c_proj.weight": ("model.layers.{}.self_attn.o_proj.weight",),
    "attn.c_proj.bias": ("model.layers.{}.self_attn.o_proj.bias",),
    "mlp.c_fc.weight": ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    "mlp.c_fc.bias": ("model.layers.{}.mlp.gate_proj.bias", "model.layers.{}.mlp.up_proj.bias"),
    "mlp.c_proj.weight": ("model.layers.{}.mlp.down_proj.weight",),
    "mlp.c_proj.bias": ("model.layers.{}.mlp.down_proj.bias",),
}
_LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``(F, ...)`` gate and up -> ``(2F, ...)`` with row ``2j`` = gate ``j``, ``2j + 1`` = up ``j``:
    each pair lands in adjacent output columns of the fused GEMV, whose epilogue computes
    ``silu(gate) * up`` (``fastgpt.reference.activate``)."""
    return torch.stack((gate, up), dim=1).flatten(0, 1)  # (F, 2, ...) -> (2F, ...)


def _convert_llama_family(hf_state: dict, expected: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, want in expected.items():
        if name in _LLAMA_TOP:
            sources = (_LLAMA_TOP[name],)
        else:
            _, index, suffix = name.split(".", 2)  # "h.{i}.{suffix}"
            sources = tuple(source.format(index) for source in _LLAMA_LAYER[suffix])
        parts = []
        for source in sources:
            tensor = hf_state.get(source)
            if tensor is None:
                raise ValueError(f"checkpoint is missing the weight {source!r}")
            parts.append(tensor)
        shapes = {tuple(p.shape[1:]) for p in parts}
        if name.endswith(("c_fc.weight", "c_fc.bias")) and len({tuple(p.shape) for p in parts}) == 1:
            tensor = interleave_gate_up(*parts)
        elif len(shapes) == 1:
            tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            tensor = None  # parts that cannot be fused: reported below
        if tensor is None or tuple(tensor.shape) != tuple(want.shape):
            what = " + ".join(f"{source!r} {tuple(p.shape)}" for source, p in zip(sources, parts))
            raise ValueError(f"weight {what} does not fit the config {config}: it needs {tuple(want.shape)} in all")
        out[name] = tensor.contiguous()
    return out


def hf_model_weights(hf_model) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and a detached copy of the weights of a transformers model (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``).

    An LM head that no longer shares the token embedding (``hf.lm_head.weight = Parameter(...)``
    with ``tie_word_embeddings`` still True) counts as untied: HF computes with that head.
    """
    config = GPTConfig.from_hf(hf_model.config)
    head, embedding = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    if config.tie_word_embeddings and head is not embedding:
        config = replace(config, tie_word_embeddings=False)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    return config, state


def hf_cache_dirs() -> list[Path]:
    """Where a Hugging Face hub cache may be on this machine, in the order HF itself looks."""
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def looks_like_hub_name(name_or_path: str) -> bool:
    """True for ``"gpt2"`` / ``"owner/name"``; False for anything path-like (``/x``, ``./x``, ``a/b/c``)."""
    return _HUB_NAME.fullmatch(name_or_path) is not None and ".." not in name_or_path


def find_checkpoint(name_or_path: str) -> Path:
    """The directory holding ``config.json`` and the weights for a path or a hub name (local only).

    A path-like argument (absolute, ``./``, ``~``, more than one ``/``) is only looked for as a
    directory; a hub name (``gpt2``, ``owner/name``) as a directory, then in the HF cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise FileNotFoundError(
            f"{path} is a directory but has no config.json; pass a directory written by transformers' "
            "save_pretrained (config.json + model.safetensors)"
        )
    if not looks_like_hub_name(name_or_path):
        raise FileNotFoundError(
            f"no such directory: {path}. Pass a directory written by transformers' save_pretrained "
            "(config.json + model.safetensors), or use random weights: GPT.from_config('gpt2') / the CLI's --random-init."
        )
    looked = []
    repo_dir_name = "models--" + name_or_path.replace("/", "--")
    for cache in hf_cache_dirs():
        snapshots = cache / repo_dir_name / "snapshots"
        looked.append(str(snapshots))
        if snapshots.is_dir():
            for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if (snap / "config.json").is_file() and weight_file(snap) is not None:
                    return snap
    raise FileNotFoundError(
        f"no weights for {name_or_path!r} on disk (fastgpt never downloads): no directory of that name, "
        f"and no cached snapshot in {', '.join(looked)}. Pass a directory holding config.json and model.safetensors "
        "(sharded or not, or pytorch_model.bin), e.g. one written by transformers' save_pretrained, or use random "
        "weights: GPT.from_config('gpt2') / the CLI's --random-init."
    )


def weight_file(directory: Path) -> Path | None:
    """The checkpoint's weight file (or shard index), safetensors first; None when there is none."""
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_config(path: Path) -> GPTConfig:
    """The GPTConfig of a ``config.json``; ValueError naming the file when it cannot be used."""
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(hf_config).__name__}")
    try:
        return GPTConfig.from_hf(hf_config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; ValueError naming the file when it cannot be read."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' SafetensorError, pickle and zip errors: all mean "unreadable"
        kind = "safetensors" if path.name.endswith(".safetensors") else "PyTorch"
        raise ValueError(f"{path} is not a readable {kind} weight file ({type(exc).__name__}: {exc})") from None


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: one file, or the shards a ``*.index.json`` lists."""
    if not weights.name.endswith(".index.json"):
        return _read_tensors(weights)
    try:
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{weights} is not a shard index with a weight_map ({type(exc).__name__}: {exc})") from None
    state = {}
    for shard in shards:
        shard_path = weights.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{weights} lists the shard {shard}, which is not in {weights.parent}")
        state.update(_read_tensors(shard_path))
    return state


def read_checkpoint(name_or_path: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and the (HF-named) tensors of a local checkpoint directory or HF cache entry."""
    directory = find_checkpoint(name_or_path)
    weights = weight_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory} has config.json but none of {', '.join(_WEIGHT_FILES)}")
    return read_config(directory / "config.json"), read_weights(weights)
