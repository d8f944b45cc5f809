"""Proximal Langevin (MYULA) for π ∝ exp(−f(x) − g(x)), f smooth (the ``potential``), g convex
and non-smooth, through the Moreau–Yosida envelope g^λ(x) = min_u g(u) + ‖u − x‖²/(2λ), whose
gradient ∇g^λ(x) = (x − prox_{λg}(x))/λ is (1/λ)-Lipschitz:

    x' = x − γ∇f(x) − (γ/λ)(x − prox_{λg}(x)) + √(2γ) z,   z ~ N(0, I).

MYULA targets π^λ ∝ exp(−f − g^λ), not π: the bias vanishes as λ, γ → 0 (for g the indicator
of a box, π^λ lets mass leave the box by O(√λ)). Stability needs γ ≤ λ/(λL_f + 1), so γ ≤ λ.

Reference: Durmus, Moulines & Pereyra 2018, "Efficient Bayesian computation by proximal Markov
chain Monte Carlo: when Langevin meets Moreau", SIAM J. Imaging Sci. 11(1), §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .langevin import LangevinInfo, check_step_size, draw_noise, energy_grad

__all__ = ["myula", "myula_box", "myula_l1", "prox_box", "prox_l1"]

Step = Callable[..., tuple[Tensor, LangevinInfo]]
Prox = Callable[[Tensor, float], Tensor]


def prox_l1(x: Tensor, t: float, weight: float = 1.0) -> Tensor:
    """prox_{t g}(x) for g = weight·‖x‖₁: soft thresholding sign(x)·max(|x| − t·weight, 0)."""
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    return torch.sign(x) * torch.clamp(x.abs() - t * weight, min=0.0)


def prox_box(x: Tensor, lower, upper) -> Tensor:
    """prox_{t g}(x) for g the indicator of the box [lower, upper] (any t): the projection, a clamp.

    ``lower``/``upper``: floats or tensors broadcastable to ``x`` (e.g. ``(d,)``), lower < upper.
    """
    lo, up = torch.as_tensor(lower).to(x), torch.as_tensor(upper).to(x)
    if not bool((lo < up).all()):
        raise ValueError(f"the box needs lower < upper elementwise, got lower={lower}, upper={upper}")
    return torch.clamp(x, lo, up)


def myula(prox: Prox, lam: float) -> Step:
    """A MYULA step for the non-smooth part g given by ``prox(x, t) = prox_{t g}(x)``.

    Returns ``step(x, potential, *, step_size, generator=None, noise=None) -> (x', LangevinInfo())``,
    the shared Langevin signature, with f = ``potential``; for ``x`` of shape ``(N, d)``

        x' = x − γ∇f(x) − (γ/λ)(x − prox_{λg}(x)) + √(2γ) z,   γ = ``step_size``, λ = ``lam``.

    Use γ ≤ λ (γ ≤ λ/(λL_f + 1) with L_f the Lipschitz constant of ∇f); with f = 0 and γ = λ the
    drift lands exactly on prox_{λg}(x). The chain targets π^λ ∝ exp(−f − g^λ), see module doc.

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> step = myula_l1(weight=1.0, lam=0.5)
        >>> x1, _ = step(torch.tensor([[2.0, 0.2]]), GaussianPotential(torch.zeros(2)), step_size=0.1,
        ...              noise=torch.zeros(1, 2))
        >>> [round(v, 6) for v in x1[0].tolist()]  # x − 0.1·x − 0.2·(x − soft(x, 0.5))
        [1.7, 0.14]
    """
    lam = float(lam)
    if not lam > 0:
        raise ValueError(f"lam (the Moreau–Yosida parameter λ) must be > 0, got {lam}")

    def step(
        x: Tensor,
        potential,
        *,
        step_size: float,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, LangevinInfo]:
        check_step_size(step_size)
        z = draw_noise(x, noise, generator)
        drift = energy_grad(potential, x) + (x - prox(x, lam)) / lam
        return x - step_size * drift + math.sqrt(2.0 * step_size) * z, LangevinInfo()

    step.__name__ = step.__qualname__ = "myula_step"
    step.lam = lam  # type: ignore[attr-defined]
    return step


def myula_l1(weight: float, lam: float) -> Step:
    """MYULA for g = weight·‖x‖₁ (Laplace prior); weight ≥ 0."""
    prox_l1(torch.zeros(()), 0.0, weight)  # validates weight now, not at the first step
    return myula(lambda x, t: prox_l1(x, t, weight), lam)


def myula_box(lower, upper, lam: float) -> Step:
    """MYULA for g the indicator of the box [lower, upper] (π restricted to the box)."""
    lo, up = torch.as_tensor(lower), torch.as_tensor(upper)
    if not bool((lo < up).all()):
        raise ValueError(f"the box needs lower < upper elementwise, got lower={lower}, upper={upper}")
    return myula(lambda x, t: prox_box(x, lo, up), lam)
