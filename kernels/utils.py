"""Helpers shared by the kernel files: interpreter detection, input checks, sm_90 compile checks.

Triton kernels run on the GPU, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
read by ``triton.jit`` when a kernel module is imported, so it must be set before that import).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

#: Shared memory one thread block may use on an H100 (sm_90): 227 KiB.
H100_SHARED_MEMORY_BYTES = 227 * 1024


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fix_interpreter_loop_bounds() -> None:
    """Let the Triton interpreter take tensor loop bounds again under numpy >= 2.4.

    The interpreter turns a ``range(lo, hi)`` bound into an int with ``int(array)``, and its scalars
    are arrays of shape ``(1,)``, which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted", triton-lang/triton#9171, unfixed in Triton 3.6). We wrap the interpreter's tensor
    patching to install an ``__index__`` that reads the single element. CPU interpreter only;
    compiled kernels are untouched. Idempotent.
    """
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - no interpreter in this Triton
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        # set_attr records the previous value and restores in LIFO order after the launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fix = True
    _interp._patch_lang_tensor = patched


if interpreting():
    fix_interpreter_loop_bounds()


# --------------------------------------------------------------------------------------------
# Programmatic dependent launch (PDL)
# --------------------------------------------------------------------------------------------
def pdl_enabled(device: torch.device | str) -> bool:
    """Whether the decode-step kernels launch on ``device`` with programmatic dependent launch.

    True on a CUDA device of compute capability >= 9.0 (Hopper: ``griddepcontrol``) unless the
    environment sets ``FASTGPT_PDL=0`` (read at every launch, so a benchmark measures PDL on and
    off side by side). Always False under the interpreter, where ``gdc_wait`` /
    ``gdc_launch_dependents`` cannot be traced. One switch gives both the kernel's ``USE_PDL``
    constexpr and the launch's ``launch_pdl``: a kernel launched early must wait.

    The contract every PDL kernel keeps: before ``gdc_wait()`` it reads only constant data
    (weights, LayerNorm parameters, biases) and writes nothing; it calls
    ``gdc_launch_dependents()`` only after its ``gdc_wait()``, so when a kernel starts, every
    kernel two or more launches back has completed.
    """
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return False
    if os.environ.get("FASTGPT_PDL", "1").strip() == "0":
        return False
    return _capability_at_least_90(device.index if device.index is not None else torch.cuda.current_device())


_CAPABILITY: dict[int, bool] = {}


def _capability_at_least_90(index: int) -> bool:
    found = _CAPABILITY.get(index)
    if found is None:
        found = _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return found


# --------------------------------------------------------------------------------------------
# One record of what ran (contract C2)
# --------------------------------------------------------------------------------------------
_LAUNCHES: dict[str, dict] = {}


def note_launch(op: str, impl: str, **details) -> None:
    """Record that the public launcher of ``op`` ran ``impl`` ("triton", "cuda", "cpu-op", "torch").

    ``details`` (the sampler's path bits tensor, the split count, the chosen plan, ...) replace the
    previous call's; ``calls`` counts the calls since :func:`reset_launch_record`. Host-side only:
    under CUDA-graph replay nothing is noted (the record shows the captured call).
    """
    calls = _LAUNCHES.get(op, {}).get("calls", 0) + 1
    _LAUNCHES[op] = {"impl": impl, "calls": calls, **details}


def launch_record() -> dict[str, dict]:
    """What each op's launcher last ran: ``{op: {"impl": ..., "calls": n, **details}}`` (a copy)."""
    return {op: dict(rec) for op, rec in _LAUNCHES.items()}


def reset_launch_record() -> None:
    """Forget every noted launch."""
    _LAUNCHES.clear()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
) -> None:
    """Raise TypeError/ValueError naming ``name`` when ``t`` is not the tensor a launcher expects."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, attrs: dict | None = None):
    """Compile ``kernel`` for sm_90 on this machine (no GPU needed) and return the compiled kernel.

    ``signature`` maps every argument name to a Triton type (``"*fp16"``, ``"i32"``, ...) or
    ``"constexpr"``; ``constexprs`` gives the constexpr values. ``.metadata.shared`` is the shared
    memory per block, ``.asm["ptx"]`` the PTX. Works under the interpreter as well (it rebuilds a
    JITFunction from the interpreted kernel's Python function). ``attrs``: argument attributes
    such as ``{(i,): [["tt.divisibility", 16]]}`` (the alignment Triton specialises on at a real launch).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton's pointer type name for a torch dtype (for compile signatures)."""
    return {
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.int32: "i32",
        torch.int64: "i64",
        torch.uint8: "u8",
        torch.bool: "i1",
    }[dtype]
