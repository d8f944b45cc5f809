"""Mirrored Langevin for constrained domains with entropic mirror maps.

With a mirror map φ (strictly convex, ∇φ: domain → Rᵈ a bijection, inverse ∇φ*), the target
π ∝ exp(−V) on the domain pushes forward under y = ∇φ(x) to the law ∝ exp(−W) on Rᵈ with

    W(y) = V(∇φ*(y)) − log det ∇²φ*(y)        (∇²φ*(y) = Jacobian of y ↦ x = ∇φ*(y)).

One step runs ULA on W in the unconstrained dual space and maps back:

    y = ∇φ(x),   y' = y − γ ∇W(y) + √(2γ) z,   x' = ∇φ*(y'),   z ~ N(0, I),

so x' is in the domain by construction. ∇W = J ∇V(x) − ∇_y log det J (J symmetric) by the
chain rule, with ∇V from ``energy_grad`` (``potential.grad_x`` or autograd), so any V works.

Domains (x of shape ``(num_particles, d)``):

- ``"orthant"`` {x > 0}: φ(x) = Σ xᵢ log xᵢ − xᵢ, ∇φ = log, ∇φ* = exp, J = diag(x),
  log det J = Σ yᵢ = Σ log xᵢ, so ∇W = x ⊙ ∇V(x) − 1.
- ``"simplex"`` interior {xᵢ > 0, Σ_{i≤d} xᵢ < 1}, x_{d+1} = 1 − Σ xᵢ: ∇φ(x)ᵢ = log(xᵢ/x_{d+1}),
  ∇φ*(y) = softmax([y, 0])[:d], J = diag(x) − x xᵀ (x the d free coordinates). By the matrix
  determinant lemma det J = Π_{i≤d} xᵢ · (1 − Σ_{i≤d} xᵢ), i.e. log det J = Σ_{i≤d+1} log xᵢ
  = Σ yᵢ − (d+1)·logsumexp([y, 0]), whose y-gradient is 1 − (d+1)x; so
  ∇W = x ⊙ g − x (xᵀg) − 1 + (d+1) x with g = ∇V(x).

Dropping the log-det term is the same as running the correct sampler on V + log det J∘∇φ, e.g.
Dirichlet(α) would turn into Dirichlet(α − 1). Float32 particles within ~1e-7 of the boundary
may round onto it; the next step then rejects them (use float64 for extreme targets).

References: Hsieh, Kavis, Rolland & Cevher 2018, "Mirrored Langevin dynamics", NeurIPS;
Zhang, Peyré, Fadili & Pereyra 2020, "Wasserstein control of mirror Langevin Monte Carlo", COLT.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .langevin import LangevinInfo, check_step_size, draw_noise, energy_grad

__all__ = ["MIRROR_DOMAINS", "mirror_langevin"]

Step = Callable[..., tuple[Tensor, LangevinInfo]]


def _orthant_bad(x: Tensor) -> Tensor:
    return ~(torch.isfinite(x) & (x > 0)).all(-1)


def _simplex_bad(x: Tensor) -> Tensor:
    return _orthant_bad(x) | ~(x.sum(-1) < 1)


def _orthant_grad_w(x: Tensor, g: Tensor) -> Tensor:
    return x * g - 1.0


def _simplex_grad_w(x: Tensor, g: Tensor) -> Tensor:
    d = x.shape[1]
    return x * g - x * (x * g).sum(-1, keepdim=True) - 1.0 + (d + 1) * x


def _simplex_to_dual(x: Tensor) -> Tensor:
    return torch.log(x) - torch.log1p(-x.sum(-1, keepdim=True))


def _simplex_to_primal(y: Tensor) -> Tensor:
    return torch.softmax(torch.cat([y, torch.zeros_like(y[:, :1])], -1), -1)[:, :-1]


# name: (∇φ, ∇φ*, ∇W from (x, ∇V(x)), rows outside the domain, description)
_DOMAINS = {
    "orthant": (torch.log, torch.exp, _orthant_grad_w, _orthant_bad, "the positive orthant x > 0"),
    "simplex": (_simplex_to_dual, _simplex_to_primal, _simplex_grad_w, _simplex_bad,
                "the open simplex x > 0, sum(x) < 1"),
}
MIRROR_DOMAINS = tuple(_DOMAINS)


def mirror_langevin(domain: str) -> Step:
    """A mirrored Langevin step on ``domain`` (``"orthant"`` or ``"simplex"``), with the shared
    signature ``step(x, potential, *, step_size, generator=None, noise=None) -> (x', LangevinInfo())``.

    ``x`` ``(num_particles, d)`` must lie in the domain (ValueError naming the number of rows
    outside); ``noise`` ``(num_particles, d)`` is the dual-space z. Returns x' = ∇φ*(y') in the domain.

    Example:
        >>> import torch
        >>> step = mirror_langevin("orthant")
        >>> V = lambda x: (x - torch.log(x)).sum(-1)      # Exp-like: ∇W = x·(1 − 1/x) − 1 = x − 2
        >>> x1, _ = step(torch.ones(1, 1), V, step_size=0.5, noise=torch.zeros(1, 1))
        >>> round(x1.item(), 6)  # exp(0 − 0.5·(1 − 2))
        1.648721
    """
    if domain not in _DOMAINS:
        raise ValueError(f"unknown mirror domain {domain!r}; allowed: {', '.join(map(repr, MIRROR_DOMAINS))}")
    to_dual, to_primal, grad_w, bad_rows, where = _DOMAINS[domain]

    def step(
        x: Tensor,
        potential,
        *,
        step_size: float,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, LangevinInfo]:
        check_step_size(step_size)
        if x.ndim != 2:
            raise ValueError(f"x must have shape (num_particles, dim), got {tuple(x.shape)}")
        bad = int(bad_rows(x).sum())
        if bad:
            raise ValueError(f"{bad} of {x.shape[0]} particles lie outside {where}")
        z = draw_noise(x, noise, generator)
        y = to_dual(x) - step_size * grad_w(x, energy_grad(potential, x))
        return to_primal(y + math.sqrt(2.0 * step_size) * z), LangevinInfo()

    step.__name__ = step.__qualname__ = f"mirror_langevin_{domain}_step"
    step.__doc__ = (
        f"Mirrored Langevin step on {where}:\n\n"
        "    y' = ∇φ(x) − γ ∇W(∇φ(x)) + √(2γ) z,   x' = ∇φ*(y'),   W = V∘∇φ* − log det ∇²φ*.\n"
    )
    step.domain = domain  # type: ignore[attr-defined]
    return step
