"""Compatibility re-export for fastgpt/backend.py: the attention kernels now live in
:mod:`.attention_prefill` and :mod:`.attention_decode` (shared parts: :mod:`.attention_common`).
Delete this file once backend.py imports those modules."""

from .attention_common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS  # noqa: F401
from .attention_decode import decode_attention, decode_workspace, warmup_decode  # noqa: F401
from .attention_prefill import prefill_attention  # noqa: F401
