"""Maximum mean discrepancy (MMD) between two samples, with a Gaussian (RBF) kernel.

Kernel, a mixture of L bandwidths h₁ … h_L:

    k(x, y) = (1/L) Σₗ exp(−‖x − y‖² / (2hₗ²)).

Unbiased estimator (U-statistic) of MMD² between the laws of X = (x₁ … xₙ) and Y = (y₁ … yₘ)
(Gretton et al., *A kernel two-sample test*, JMLR 2012, eq. 3):

    MMD²ᵤ = 1/(n(n−1)) Σ_{i≠j} k(xᵢ, xⱼ) + 1/(m(m−1)) Σ_{i≠j} k(yᵢ, yⱼ) − 2/(nm) Σᵢⱼ k(xᵢ, yⱼ).

Its expectation is exactly MMD² (0 when both samples come from the same law); it can be
negative. For two Gaussians N(μ₁, s²I) and N(μ₂, s²I) in dimension d, X − Y ~ N(μ₁ − μ₂, 2s²I),
and E exp(−‖Z‖²/(2h²)) = (h²/(h² + σ²))^{d/2} exp(−‖m‖²/(2(h² + σ²))) for Z ~ N(m, σ²I), so

    MMD² = (1/L) Σₗ 2 (hₗ²/(hₗ² + 2s²))^{d/2} [1 − exp(−‖μ₁ − μ₂‖² / (2(hₗ² + 2s²)))]

(:func:`rbf_mmd2_gaussians`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["rbf_kernel", "mmd2", "rbf_mmd2_gaussians"]


def _check_bandwidths(bandwidths: Sequence[float]) -> tuple[float, ...]:
    bw = tuple(float(h) for h in bandwidths)
    if not bw or any(not h > 0 for h in bw):
        raise ValueError(f"bandwidths must be a non-empty sequence of numbers > 0, got {bandwidths!r}")
    return bw


def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    # ‖x‖² + ‖y‖² − 2x·y: O(nm) memory instead of the O(nmd) of broadcasting differences
    # (64-dimensional digits with 1,000 points each would need 256 MB otherwise).
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0)


def rbf_kernel(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """Gram matrix k(xᵢ, yⱼ) of the bandwidth-mixture RBF kernel; ``x`` ``(n, d)``, ``y`` ``(m, d)`` → ``(n, m)``.

    Example:
        >>> import torch
        >>> rbf_kernel(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), [1.0])  # exp(−1/2)
        tensor([[0.6065]])
    """
    bw = _check_bandwidths(bandwidths)
    d2 = _sq_dists(x, y)
    return sum(torch.exp(-d2 / (2.0 * h * h)) for h in bw) / len(bw)


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (1.0,), *, unbiased: bool = True) -> Tensor:
    """MMD² between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)`` (module docstring), a 0-d tensor.

    ``unbiased=False`` gives the biased V-statistic (diagonal terms kept), which is ≥ 0 but has
    expectation MMD² + O(1/n); it exists as a reference and for tests.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
        >>> abs(float(mmd2(a, b, [1.0]))) < 0.01          # same law: ≈ 0
        True
        >>> float(mmd2(a, b + 3.0, [1.0])) > 0.5           # shifted by 3 in each coordinate
        True
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have shapes (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and (n < 2 or m < 2):
        raise ValueError(f"the unbiased MMD² needs at least 2 points in each sample, got n={n}, m={m}")
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidths), rbf_kernel(y, y, bandwidths), rbf_kernel(x, y, bandwidths)
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    # k(x, x) = 1 exactly for an RBF kernel; subtract the diagonals as computed (the clamp keeps them 1).
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


def rbf_mmd2_gaussians(mean1: Sequence[float], mean2: Sequence[float], variance: float,
                       bandwidths: Sequence[float] = (1.0,)) -> float:
    """Closed-form MMD² between N(μ₁, s²I) and N(μ₂, s²I) for the kernel of :func:`mmd2` (module docstring).

    Example:
        >>> rbf_mmd2_gaussians([0.0, 0.0], [0.0, 0.0], 1.0)
        0.0
    """
    bw = _check_bandwidths(bandwidths)
    if not variance > 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    mu1, mu2 = [float(v) for v in mean1], [float(v) for v in mean2]
    if len(mu1) != len(mu2) or not mu1:
        raise ValueError(f"mean1 and mean2 must have the same length >= 1, got {len(mu1)} and {len(mu2)}")
    d = len(mu1)
    delta2 = sum((a - b) ** 2 for a, b in zip(mu1, mu2))
    total = 0.0
    for h in bw:
        c = h * h + 2.0 * variance
        total += 2.0 * (h * h / c) ** (d / 2) * (1.0 - math.exp(-delta2 / (2.0 * c)))
    return total / len(bw)
