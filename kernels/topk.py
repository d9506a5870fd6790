"""Top-k over the last dimension of a 2-D tensor: the ``fastgpt::topk`` C++/CUDA extension.

Maths and layout
----------------
``x``: ``(rows, n)`` float32 / float16 / bfloat16 on CPU or CUDA, any strides, ``1 <= k <= n``.
Returns ``values`` ``(rows, k)`` in ``x``'s dtype and ``indices`` ``(rows, k)`` int64 (both
contiguous) such that ``values[r] = x[r, indices[r]]`` are the ``k`` largest entries of row ``r``
in the order of a stable descending sort -- exactly :func:`fastgpt.reference.topk`:

* larger first; ties (and NaNs among themselves) by ascending index;
* NaN ranks above ``+inf`` whatever its sign bit; ``-0.0 == +0.0`` (a tie, ordered by index).

Both C++ implementations rank elements by a unique 64-bit composite key
``order_key(x) << b | (2^b - 1 - col)`` (``csrc/topk_keys.h``), so "the k largest" is a set with
no tie rules left. CPU (``csrc/ops.cpp``): ``nth_element`` + ``sort`` per row. CUDA
(``csrc/topk.cu``): for ``k <= 256`` several blocks per row radix-select each 4096-element chunk's
top-k candidates, then one block per row selects and ranks the final ``k`` (two launches for a
GPT-2 row); larger ``k`` sorts the composites with ``at::sort``. No host sync, workspace from the
caching allocator: CUDA-graph capturable. A fake (meta) implementation is registered here so that
``torch.compile`` traces through the op.

Build and fallback
------------------
:func:`load_extension` builds the extension on first use with
``torch.utils.cpp_extension.load`` into ``$FASTGPT_CACHE_DIR/torch_extensions/fastgpt_ops-<torch>-<cuda|cpu>``
(``FASTGPT_CACHE_DIR`` defaults to ``~/.cache/fastgpt``); ``python -m fastgpt.kernels.topk
--rebuild`` deletes that folder and builds again. The CUDA source is compiled only when PyTorch
sees a GPU and a CUDA toolkit. The sources are ``csrc/`` beside ``kernels/`` in a source tree, and
``fastgpt/csrc/`` (package data) in an installed fastgpt: the same path relative to this file.
When the build is impossible (no compiler, no ninja, a compile error, the sources missing)
:func:`topk` falls back to :func:`fastgpt.reference.topk` (a stable ``torch.sort``: same results,
slower) after ONE warning per process that says why. :func:`topk_backend` says which path a device
gets; ``launch_record()["topk"]`` (:mod:`fastgpt.kernels.utils`) which one the last call used.
"""

from __future__ import annotations

import argparse
import functools
import operator
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from fastgpt import reference
from .utils import check_tensor, note_launch

__all__ = [
    "topk",
    "load_extension",
    "extension_available",
    "topk_backend",
    "build_dir",
    "nvcc_flags",
    "SMALL_K_MAX",
]

#: The C++/CUDA sources: <tree>/csrc beside <tree>/kernels, or <site-packages>/fastgpt/csrc beside
#: <site-packages>/fastgpt/kernels once installed (pyproject.toml ships them as package data).
CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("ops.cpp", "topk.cu", "topk_checks.h", "topk_keys.h")
_EXT_NAME = "fastgpt_ops"
_OP_NAME = "fastgpt::topk"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ROW = 2**31 - 1
#: Largest k of the CUDA multi-block radix-select path (larger k sorts).
SMALL_K_MAX = 256

CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]

_warned = False  # the fallback warning is issued once per process
_fake_registered = False
_kernel_devices: frozenset[str] = frozenset()  # device types with a loaded fastgpt::topk kernel
#: topk_backend()'s names -> the impl noted in the launch record (contract C2).
_IMPL = {"cuda-ext": "cuda", "cpu-ext": "cpu-op", "torch-fallback": "torch"}


def _warn_fallback(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fastgpt: the fastgpt_ops C++/CUDA extension could not be built or loaded ({reason}); "
        "fastgpt.kernels.topk.topk falls back to fastgpt.reference.topk (torch.sort: same results, slower).",
        RuntimeWarning,
        stacklevel=3,
    )


def _cuda_toolkit_found() -> bool:
    from torch.utils import cpp_extension

    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    home = cpp_extension.CUDA_HOME
    if home is not None and (Path(home) / "bin" / "nvcc").exists():
        return True
    return shutil.which("nvcc") is not None


def build_dir(with_cuda: bool) -> Path:
    """``$FASTGPT_CACHE_DIR/torch_extensions/fastgpt_ops-<torch>-<cuda|cpu>`` (default root ``~/.cache/fastgpt``)."""
    root = Path(os.environ.get("FASTGPT_CACHE_DIR") or Path.home() / ".cache" / "fastgpt")
    version = torch.__version__.replace("+", "_")
    return root / "torch_extensions" / f"{_EXT_NAME}-{version}-{'cuda' if with_cuda else 'cpu'}"


def nvcc_flags() -> list[str]:
    """The extra nvcc flags of the extension build (torch adds its own defines and -std)."""
    # -lineinfo: compute-sanitizer reports source lines; it does not change the generated code.
    return ["-O3", "--threads=2", "-lineinfo", *CUDA_ARCH_FLAGS]


def _build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    missing = [name for name in _SOURCES if not (CSRC / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the extension's sources {missing} are not in {CSRC} (a fastgpt installed without its csrc "
            "package data?)"
        )
    sources = [str(CSRC / "ops.cpp")] + ([str(CSRC / "topk.cu")] if with_cuda else [])
    folder = build_dir(with_cuda)
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_EXT_NAME,
        sources=sources,
        build_directory=str(folder),
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(),
        extra_include_paths=[str(CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FASTGPT_EXT_VERBOSE", "0") == "1",
    )


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 1500 else text[:500] + " ... " + text[-1000:]


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, dispatch_key))
    except RuntimeError:  # the op is not registered at all
        return False


def _topk_fake(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 2, lambda: f"fastgpt::topk: x must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _DTYPES, lambda: f"fastgpt::topk: unsupported dtype {x.dtype}")
    torch._check(k >= 1, lambda: f"fastgpt::topk: k must be >= 1, got {k}")
    torch._check(k <= x.shape[1], lambda: f"fastgpt::topk: k must be <= the row length {x.shape[1]}, got {k}")
    rows = x.shape[0]
    return x.new_empty((rows, k)), x.new_empty((rows, k), dtype=torch.long)


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:
        torch.library.register_fake(_OP_NAME)(_topk_fake)
        _fake_registered = True


@functools.cache
def load_extension() -> bool:
    """Build (the first time; later calls reuse the build directory) and load ``fastgpt_ops``.

    Returns
    -------
    bool
        True when the op is registered with at least its CPU kernel (and its CUDA kernel when this
        machine has a GPU and a CUDA toolkit). False, after one ``RuntimeWarning`` per process,
        when nothing could be built; :func:`topk` then falls back to the reference.
    """
    global _kernel_devices
    reasons = []
    built = False
    # With a GPU: the CPU + CUDA build, and if that fails at least the CPU one.
    attempts = [True, False] if _cuda_toolkit_found() else [False]
    for with_cuda in attempts:
        try:
            _build(with_cuda)
            built = True
            break
        except Exception as exc:  # noqa: BLE001 -- any build failure means: fall back
            reasons.append(("CUDA build: " if with_cuda else "CPU build: ") + _short(exc))
    devices = (("cpu", "CPU"), ("cuda", "CUDA"))
    _kernel_devices = frozenset(d for d, key in devices if _has_kernel(key)) if built else frozenset()
    if reasons:
        _warn_fallback("; ".join(reasons))
    if "cpu" in _kernel_devices:
        _register_fake()
    return "cpu" in _kernel_devices


def extension_available(device: torch.device | str) -> bool:
    """Whether ``fastgpt::topk`` has a compiled kernel for tensors on ``device``."""
    return load_extension() and torch.device(device).type in _kernel_devices


def topk_backend(device: torch.device | str) -> str:
    """The path :func:`topk` takes on ``device``: ``"cuda-ext"``, ``"cpu-ext"`` or ``"torch-fallback"``."""
    device = torch.device(device)
    if extension_available(device):
        return f"{device.type}-ext"
    return "torch-fallback"


def _check_args(x: object, k: object) -> int:
    check_tensor(x, "x", ndim=2, dtypes=_DTYPES)
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x must be on a cpu or cuda device, got {x.device}")
    n = x.shape[1]
    if n > _MAX_ROW:
        raise ValueError(f"x's rows may hold at most {_MAX_ROW} elements, got {n}")
    if isinstance(k, torch.SymInt):  # symbolic under torch.compile: the fake impl checks it
        return k
    if isinstance(k, (bool, torch.Tensor)) or not hasattr(type(k), "__index__"):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    k = operator.index(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (1 to the row length of x), got {k}")
    return k


def _write_out(out: object, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a (values, indices) pair of tensors")
    out_values, out_indices = out
    check_tensor(out_values, "out[0] (values)", ndim=2, dtypes=(values.dtype,), device=values.device)
    check_tensor(out_indices, "out[1] (indices)", ndim=2, dtypes=(torch.int64,), device=values.device)
    for name, t in (("out[0] (values)", out_values), ("out[1] (indices)", out_indices)):
        if tuple(t.shape) != tuple(values.shape):
            raise ValueError(f"{name} must have shape {tuple(values.shape)}, got {tuple(t.shape)}")
    out_values.copy_(values)
    out_indices.copy_(indices)
    return out_values, out_indices


def topk(
    x: torch.Tensor,
    k: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``x``, sorted descending (ties by lower index).

    Parameters
    ----------
    x : (rows, n) float32, float16 or bfloat16 tensor on CPU or CUDA, any strides.
    k : int, 1 <= k <= n.
    out : optional (values, indices) pair of preallocated (rows, k) tensors (x's dtype, int64) on
        x's device; the result is copied into them (the op itself allocates its outputs).

    Returns
    -------
    (values, indices) : (rows, k) in x's dtype and (rows, k) int64, equal to
        :func:`fastgpt.reference.topk` (NaN above +inf, -0.0 == +0.0).

    Raises
    ------
    TypeError / ValueError
        naming the argument, before any kernel runs.
    """
    k = _check_args(x, k)
    if torch.compiler.is_compiling():
        # Traced by torch.compile: no build, no Python state; the op (and its fake) must have been
        # loaded eagerly before (call load_extension() first).
        if x.device.type in _kernel_devices:
            values, indices = torch.ops.fastgpt.topk(x, k)
        else:
            values, indices = reference.topk(x, k)
    else:
        backend = topk_backend(x.device)
        if backend == "torch-fallback":
            values, indices = reference.topk(x, k)
            values, indices = values.contiguous(), indices.contiguous()
        else:
            values, indices = torch.ops.fastgpt.topk(x, k)
        note_launch("topk", _IMPL[backend], backend=backend)
    if out is not None:
        return _write_out(out, values, indices)
    return values, indices


def rebuild() -> bool:
    """Delete this machine's build folders of the extension, then build and load it again."""
    for with_cuda in (False, True):
        shutil.rmtree(build_dir(with_cuda), ignore_errors=True)
    load_extension.cache_clear()
    return load_extension()


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgpt.kernels.topk [--rebuild]``: build (or rebuild) the extension, say what loaded."""
    parser = argparse.ArgumentParser(prog="python -m fastgpt.kernels.topk", description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true", help="delete the build folder first, then build")
    args = parser.parse_args(argv)
    ok = rebuild() if args.rebuild else load_extension()
    print(f"fastgpt_ops sources: {CSRC}")
    print(f"build folder: {build_dir(_cuda_toolkit_found())}")
    print(f"cpu: {topk_backend('cpu')}; cuda: {topk_backend('cuda') if torch.cuda.is_available() else 'no GPU'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
