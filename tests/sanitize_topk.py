"""A few small fastgpt::topk cases on CUDA, checked against fastgpt.reference.topk.

Meant to run under compute-sanitizer (the lead's ``make gpu-check``)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/sanitize_topk.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/sanitize_topk.py

The cases cover every kernel of csrc/topk.cu: the final kernel straight from x (n <= 4096), one
and two chunk rounds (including a round-2 chunk that holds only empty slots), an all-equal row,
strided input, and the large-k sort path. Sizes are small because racecheck is slow. Build the
extension before (any pytest run of tests/test_topk.py does); otherwise this script builds it.
Exit status: 0 all match (or no GPU: nothing to check), 1 a mismatch, 2 the CUDA op is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastgpt.reference import topk as reference_topk  # noqa: E402
from fastgpt.kernels import topk as topk_mod  # noqa: E402

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _rows(rows: int, n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "dups":
        x = torch.randint(-4, 4, (rows, n), generator=g).float()
    elif kind == "equal":
        x = torch.full((rows, n), 0.5)
    else:
        x = torch.randn(rows, n, generator=g)
        if kind == "special":
            u = torch.rand(rows, n, generator=g)
            x[u < 0.05] = float("nan")
            x[(u >= 0.05) & (u < 0.1)] = float("inf")
            x[(u >= 0.1) & (u < 0.15)] = -0.0
            x[(u >= 0.15) & (u < 0.2)] = 0.0
    return x.to(dtype)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_topk: no CUDA GPU, nothing to check")
        return 0
    if topk_mod.topk_backend("cuda") != "cuda-ext":
        print("sanitize_topk: FAILED: the fastgpt_ops CUDA kernel is not available", file=sys.stderr)
        return 2
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cases = [
        ("n7 final-from-x", _rows(3, 7, f32, "randn", 1), (3, 7)),
        ("n4096 final-from-x", _rows(2, 4096, f16, "dups", 2), (100,)),
        ("n9000 one round", _rows(2, 9000, f32, "special", 3), (50,)),
        ("n9000 one round bf16", _rows(1, 9000, bf16, "dups", 4), (256,)),
        ("n5000 all equal", _rows(1, 5000, f32, "equal", 5), (256,)),
        ("n70000 two rounds", _rows(1, 70000, f32, "dups", 6), (256,)),
        ("n81970 empty chunk", _rows(1, 81970, f16, "randn", 7), (200,)),
        ("strided cols", _rows(6000, 3, f32, "randn", 8).t(), (40,)),
        ("large k sort", _rows(2, 3000, f32, "special", 9), (300,)),
    ]
    failures = 0
    for name, x, ks in cases:
        xc = x.cuda()
        for k in ks:
            values, indices = torch.ops.fastgpt.topk(xc, k)
            torch.cuda.synchronize()
            ref_values, ref_indices = reference_topk(x, k)
            ok = torch.equal(indices.cpu(), ref_indices) and torch.equal(
                values.cpu().view(BITS[x.dtype]), x.gather(1, ref_indices).view(BITS[x.dtype])
            )
            print(f"sanitize_topk: {name:22s} k={k:<4d} {'ok' if ok else 'MISMATCH'}")
            failures += not ok
    if failures:
        print(f"sanitize_topk: FAILED: {failures} case(s) differ from the reference", file=sys.stderr)
        return 1
    print("sanitize_topk: all cases match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
