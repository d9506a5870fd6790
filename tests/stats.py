"""Chi-square goodness of fit in plain torch (scipy is not on the GPU image)."""

from __future__ import annotations

import torch


def chisquare_pvalue(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of ``observed`` counts against ``expected`` counts.

    Bins with an expected count below ``min_expected`` are pooled into one bin (the test's
    approximation needs about 5 per bin). Both tensors must have the same total.
    """
    observed = observed.double().flatten().cpu()
    expected = expected.double().flatten().cpu()
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        if expected[-1] == 0:
            observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    if dof < 1:
        return 1.0
    # Survival function of chi2(dof) at stat = regularised upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))
