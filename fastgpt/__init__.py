"""fastgpt: GPT-2 inference at the memory-bandwidth limit.

>>> from fastgpt import GPT
>>> model = GPT.from_config("gpt2")            # random weights of GPT-2 small's shape
>>> out = model.generate(input_ids, max_new_tokens=50)
"""

from .backend import kernels_report, reset_kernels_report, resolve_backend
from .config import PRESETS, GPTConfig
from .generate import generate
from .kv_cache import KVCache
from .model import GPT

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "PRESETS",
    "generate",
    "kernels_report",
    "reset_kernels_report",
    "resolve_backend",
]
__version__ = "0.1.0"
