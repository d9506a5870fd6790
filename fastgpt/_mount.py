"""The one door between the package ``fastgpt`` and the kernel folder ``kernels/``.

The kernels live in the top-level folder ``kernels/`` of the source tree, but they are imported as
``fastgpt.kernels``: the bare name ``kernels`` belongs to Hugging Face's ``kernels`` package (which
``transformers`` integrates), and installing both must not overwrite one with the other.

- Installed (``pip install .`` or ``-e .``), ``pyproject.toml`` maps ``fastgpt.kernels`` onto
  ``kernels/`` (``package-dir``), and the import system finds it on its own.
- Imported from a source tree (``PYTHONPATH=.`` as on the GPU machine, which has no network to
  install anything, or an editable install), :func:`mount_kernels` registers the tree's
  ``kernels/`` folder under that name, once, before anything imports a kernel.

Kernel modules import each other relatively (``from .utils import ...``) and reach into ``fastgpt``
only for its PyTorch reference ops (``fastgpt.reference``), so this is the only coupling.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

KERNELS_NAME = "fastgpt.kernels"


def _source_tree_kernels() -> Path | None:
    """The ``kernels/`` folder beside this ``fastgpt/`` when both sit in a fastgpt source tree."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file():
        return root / "kernels"
    return None


def mount_kernels() -> None:
    """Make ``fastgpt.kernels`` importable.

    A ``fastgpt`` imported from a source tree always takes that tree's ``kernels/`` (also when
    another checkout is installed in editable mode: its finder would map the name elsewhere);
    an installed ``fastgpt`` takes its installed ``fastgpt.kernels``.
    """
    if KERNELS_NAME in sys.modules:
        return
    folder = _source_tree_kernels()
    if folder is None:
        if importlib.util.find_spec(KERNELS_NAME) is None:
            raise ImportError("fastgpt: the kernel package fastgpt.kernels is missing from this install")
        return
    spec = importlib.util.spec_from_file_location(
        KERNELS_NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS_NAME] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["fastgpt"], "kernels", module)
