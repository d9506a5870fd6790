"""fastgpt: GPT-2 and LLaMA-family (Llama, Qwen2, Mistral) inference at the memory-bandwidth limit.

>>> from fastgpt import GPT
>>> model = GPT.from_config("gpt2")            # random weights of GPT-2 small's shape
>>> model = GPT.from_pretrained("path/to/Llama-3.2-1B", dtype="bfloat16", device="cuda")
>>> out = model.generate(input_ids, max_new_tokens=50)
>>> fast = fastgpt.accelerate(hf_model)         # drop-in generate() for a transformers GPT-2/Llama/Qwen2/Mistral
>>> fastgpt.run_report()                        # what ran: dispatch, the last generate, the launches
"""

from ._mount import mount_kernels

mount_kernels()  # makes ``fastgpt.kernels`` importable from a source tree too; see fastgpt/_mount.py

from .backend import kernels_report, last_generate_stats, reset_kernels_report, resolve_backend, run_report
from .config import PRESETS, GPTConfig
from .cuda_graph import clear_graph_cache
from .generation import generate
from .hf_compat import AcceleratedModel, FallbackWarning, accelerate
from .kv_cache import KVCache
from .model import GPT
from .settings import GenerationSettings

__all__ = [
    "AcceleratedModel",
    "FallbackWarning",
    "GPT",
    "GPTConfig",
    "GenerationSettings",
    "KVCache",
    "PRESETS",
    "accelerate",
    "clear_graph_cache",
    "generate",
    "kernels_report",
    "last_generate_stats",
    "reset_kernels_report",
    "resolve_backend",
    "run_report",
]
__version__ = "0.1.0"
