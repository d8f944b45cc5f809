"""Reward-tilted potential V(x, θ) − λR(x): the target π*(θ)·exp(λR)/Z.

Adding a differentiable reward to the energy is the paper's comparison in §5.1
("sampling from V − λR_s"): it samples the maximizer of E_p[λR] − KL(p‖π*(θ)) for fixed θ,
without learning θ.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .potentials import Potential

__all__ = ["TiltedPotential"]


class TiltedPotential(Potential):
    """Energy ``base(x) − weight · reward_fn(x)``; ∇ₓ via the base's closed form plus autograd on R."""

    def __init__(self, base: Potential, reward_fn: Callable[[Tensor], Tensor], weight: float):
        super().__init__()
        self.base = base
        self.reward_fn = reward_fn
        self.weight = float(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) - self.weight * self.reward_fn(x)
