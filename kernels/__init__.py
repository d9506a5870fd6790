"""fastgpt's kernels: Triton attention and sampling, and the Python wrapper of the CUDA top-k op.

Nothing is imported here eagerly: Triton (or a compiler for the CUDA op) may be missing, and the
model then runs its PyTorch reference path (``fastgpt.reference``). Import the submodules directly.
"""
