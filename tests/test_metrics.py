"""MMD² with a Gaussian kernel: exact against brute force; statistical against its known expectations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, randn64

from implicit_diffusion.metrics import mmd2, rbf_kernel, rbf_mmd2_gaussians

BW = (0.5, 1.0, 2.0)


def _brute_force(x, y, bandwidths):
    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h)) for h in bandwidths) / len(bandwidths)

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return torch.tensor(sxx + syy - 2 * sxy, dtype=torch.float64)


def test_mmd2_equals_the_u_statistic_by_hand(generator):
    x, y = randn64(generator, 7, 3), randn64(generator, 5, 3) + 0.7
    assert_close64(mmd2(x, y, BW), _brute_force(x, y, BW))
    assert_close64(rbf_kernel(x, x, BW).diagonal(), torch.ones(7, dtype=torch.float64))
    # symmetric in its arguments, and the biased version keeps the diagonals (k = 1 there)
    assert_close64(mmd2(y, x, BW), mmd2(x, y, BW))
    kxx, kyy, kxy = rbf_kernel(x, x, BW), rbf_kernel(y, y, BW), rbf_kernel(x, y, BW)
    assert_close64(mmd2(x, y, BW, unbiased=False), kxx.mean() + kyy.mean() - 2 * kxy.mean())


def _repeat(generator, reps, n, shift, estimator=mmd2, sd=1.0):
    vals = []
    for _ in range(reps):
        x = sd * randn64(generator, n, 2)
        y = sd * randn64(generator, n, 2) + torch.tensor(shift, dtype=torch.float64)
        vals.append(float(estimator(x, y)))
    return torch.tensor(vals, dtype=torch.float64)


def _mean_check(vals, expected):
    """|mean of R independent replicates − expected| ≤ Z·sd/√R (sd estimated from the replicates)."""
    return abs(float(vals.mean()) - expected) <= Z * float(vals.std()) / math.sqrt(vals.numel())


def test_same_law_has_mean_zero_and_the_biased_statistic_does_not(generator):
    """The U-statistic's expectation is exactly 0 under the null; 400 replicates of n = m = 40."""
    vals = _repeat(generator, 400, 40, [0.0, 0.0], lambda a, b: mmd2(a, b, BW))
    assert _mean_check(vals, 0.0)
    # negative control: the V-statistic (diagonals kept) is biased upward by O(1/n)
    biased = _repeat(generator, 400, 40, [0.0, 0.0], lambda a, b: mmd2(a, b, BW, unbiased=False))
    assert not _mean_check(biased, 0.0)


def test_matches_the_closed_form_for_two_gaussians(generator):
    """N(0, s²I) vs N((1, 0.5), s²I), s = 0.8: the mean of 400 U-statistics (n = m = 50) is the closed form."""
    s, shift = 0.8, [1.0, 0.5]
    exact = rbf_mmd2_gaussians([0.0, 0.0], shift, s * s, BW)
    vals = _repeat(generator, 400, 50, shift, lambda a, b: mmd2(a, b, BW), sd=s)
    assert _mean_check(vals, exact)
    # negative controls: the formula with s² in place of 2s² (X − Y has variance 2s²), and Δ = 0
    wrong = sum(2 * (h * h / (h * h + s * s)) * (1 - math.exp(-1.25 / (2 * (h * h + s * s)))) for h in BW) / len(BW)
    assert not _mean_check(vals, wrong)
    assert not _mean_check(vals, 0.0)


def test_closed_form_limits():
    # far apart: MMD² → E k(X,X') + E k(Y,Y') = 2 (h²/(h²+2s²))^{d/2}
    assert rbf_mmd2_gaussians([0.0], [1e3], 0.5, [1.0]) == pytest.approx(2 * (1 / 2) ** 0.5)
    assert rbf_mmd2_gaussians([0.0, 1.0], [0.0, 1.0], 2.0, BW) == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: mmd2(torch.zeros(3, 2), torch.zeros(3, 3)), "shapes"),
    (lambda: mmd2(torch.zeros(1, 2), torch.zeros(3, 2)), "at least 2"),
    (lambda: mmd2(torch.zeros(3, 2), torch.zeros(3, 2), [0.0]), "bandwidths"),
    (lambda: rbf_mmd2_gaussians([0.0], [1.0], -1.0), "variance"),
    (lambda: rbf_mmd2_gaussians([0.0], [1.0, 2.0], 1.0), "same length"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
