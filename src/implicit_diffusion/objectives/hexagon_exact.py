"""Exact quantities of the §5.1 target, a mixture of isotropic Gaussians on a hexagon.

π*(θ) = Σₖ wₖ N(cₖ, σ²I) with w = softmax(θ), so for any reward
E_{π*(θ)}[R] = Σₖ wₖ eₖ with eₖ = E_{N(cₖ, σ²I)}[R]; both §5.1 rewards are products
f₁(x₁) f₂(x₂), and eₖ is computed once:

- indicator reward: E[1[X ≥ 0] e^{−(X−a)²/(2s²)}] for X ~ N(m, v) is
  √(s²/(s²+v)) e^{−(m−a)²/(2(s²+v))} Φ(μ'/σ'), with σ'² = vs²/(v+s²), μ' = (ms² + av)/(v+s²);
- smoothed reward: the sigmoid factor by Gauss–Hermite quadrature (smooth integrand).

KL(π*(θ)‖π*(θ₀)) has no closed form; it is computed by quadrature on a fine grid (the
densities are smooth and decay like Gaussians, so the rule converges very fast).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .rewards import REWARD_CENTRE

__all__ = ["ExactEvaluation", "MixtureKL", "component_reward_expectations"]

_S2 = 10.0  # exp(−q/20) = exp(−q/(2 s²)) with s² = 10


def _gauss_factor(m: np.ndarray, v: float, a: float) -> np.ndarray:
    return math.sqrt(_S2 / (_S2 + v)) * np.exp(-((m - a) ** 2) / (2 * (_S2 + v)))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    from math import erf

    return np.array([0.5 * (1 + erf(t / math.sqrt(2))) for t in np.atleast_1d(z)])


def component_reward_expectations(means: np.ndarray, variance: float, reward: str) -> np.ndarray:
    """eₖ = E_{N(cₖ, σ²I)}[R] for R ∈ {``"indicator"``, ``"smooth"``}, shape ``(K,)`` (float64)."""
    means = np.asarray(means, dtype=np.float64)
    a1, a2 = REWARD_CENTRE
    m1, m2 = means[:, 0], means[:, 1]
    f2 = _gauss_factor(m2, variance, a2)
    if reward == "indicator":
        sd = math.sqrt(variance * _S2 / (variance + _S2))
        mu = (m1 * _S2 + a1 * variance) / (variance + _S2)
        f1 = _gauss_factor(m1, variance, a1) * _normal_cdf(mu / sd)
        return f1 * f2 / 2.5
    if reward == "smooth":
        z, w = np.polynomial.hermite_e.hermegauss(120)  # ∫ f(z) e^{−z²/2} dz ≈ Σ wᵢ f(zᵢ)
        w = w / math.sqrt(2 * math.pi)
        x1 = m1[:, None] + math.sqrt(variance) * z[None, :]
        g = 1 / (1 + np.exp(-x1 / 0.5)) * np.exp(-((x1 - a1) ** 2) / (2 * _S2))
        return (g @ w) * f2 / 0.7
    raise ValueError(f"unknown reward {reward!r}; allowed: 'indicator', 'smooth'")


class MixtureKL:
    """KL(Σ wₖN(cₖ,σ²I) ‖ Σ w⁰ₖN(cₖ,σ²I)) by the midpoint rule on a grid of spacing ``h``.

    Densities are kept in float64 (the smallest, 10σ and more from every centre, stay far above
    underflow), so one evaluation is a matrix-vector product and a log over the grid. It runs in
    torch, not NumPy: NumPy's BLAS threads spin after each call and would compete with the
    sampling loop for the CPU cores between evaluations.
    """

    def __init__(self, means: np.ndarray, variance: float, ref_weights: np.ndarray, h: float = 0.1,
                 margin: float = 10.0):
        means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        sd = math.sqrt(variance)
        lo = means.min(0).values - margin * sd
        hi = means.max(0).values + margin * sd
        axes = [torch.arange(float(lo[i]), float(hi[i]) + h, h, dtype=torch.float64) for i in range(2)]
        pts = torch.cartesian_prod(*axes)
        sq = torch.cdist(pts, means) ** 2
        self._densities = torch.exp(-sq / (2 * variance)) / (2 * math.pi * variance)  # (G, K)
        self._cell = h * h
        self._log_q = torch.log(self._densities @ torch.as_tensor(np.asarray(ref_weights), dtype=torch.float64))

    def __call__(self, weights) -> float:
        p = self._densities @ torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        return float(p @ (torch.log(p) - self._log_q) * self._cell)


class ExactEvaluation:
    """The §5.1 quantities of π*(θ) = Σₖ softmax(θ)ₖ N(cₖ, σ²I), exactly, from θ alone.

    ``self(logits)`` → ``{"exact_reward": E_{π*(θ)}[R] = Σₖ wₖ eₖ, "kl": KL(π*(θ)‖π*(θ₀)),
    "weights": w}`` with w = softmax(θ) (float64); ``reward_initial`` is E_{π*(θ₀)}[R] and
    ``reward_optimum`` = maxₖ eₖ (all the mass on the best component).

    >>> import torch
    >>> from implicit_diffusion.models import hexagon_centres
    >>> ev = ExactEvaluation(hexagon_centres(dtype=torch.float64).numpy(), 1.0, "indicator", [0.0] * 6)
    >>> round(ev.reward_optimum, 4), ev(torch.zeros(6))["kl"] == 0.0
    (0.2983, True)
    """

    def __init__(self, means: np.ndarray, variance: float, reward: str, theta0) -> None:
        self.component_rewards = component_reward_expectations(means, variance, reward)
        theta0_weights = torch.softmax(torch.as_tensor(theta0, dtype=torch.float64), 0).numpy()
        self.mixture_kl = MixtureKL(means, variance, theta0_weights)
        self.reward_initial = float(theta0_weights @ self.component_rewards)
        self.reward_optimum = float(self.component_rewards.max())

    def __call__(self, logits: torch.Tensor) -> dict:
        w = torch.softmax(logits.detach().double().cpu(), 0).numpy()
        return {"exact_reward": float(w @ self.component_rewards), "kl": self.mixture_kl(w), "weights": w}
