"""Translated potential V_s(y, θ) = V(y − s, θ): the same target moved by a fixed vector s.

If X ~ π*(θ) ∝ exp(−V(·, θ)) then Y = X + s ~ exp(−V_s(·, θ)). A sampler for a domain that
the original target does not fit (mirror Langevin on the positive orthant for a target on ℝᵈ
whose mass lies within a bounded region) can run on V_s, with particles mapped back by −s.
θ is shared: the wrapped potential's parameters are this module's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .potentials import Potential, autograd_energy_grad

__all__ = ["ShiftedPotential"]


class ShiftedPotential(Potential):
    """V_s(y) = ``base``(y − s) with ``shift`` s of shape ``(dim,)`` (or a float, every coordinate).

    ``grad_x`` and ``accumulate_param_grad`` use the base's closed forms at y − s when it has
    them (∇_y V_s(y) = ∇V(y − s); ∇θV_s(y) = ∇θV(y − s)).

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> V = ShiftedPotential(GaussianPotential(torch.zeros(2)), 10.0)   # N(0, I) moved to N(10, I)
        >>> V(torch.tensor([[10.0, 10.0], [11.0, 10.0]])).tolist()
        [0.0, 0.5]
    """

    def __init__(self, base: Potential, shift: float | Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()).detach().clone())
        if not torch.isfinite(self.shift).all():
            raise ValueError(f"shift must be finite, got {self.shift.tolist()}")

    def unshift(self, y: Tensor) -> Tensor:
        """x = y − s, the particles in the base potential's coordinates."""
        return y - self.shift.to(y)

    def forward(self, y: Tensor) -> Tensor:
        return self.base(self.unshift(y))

    def grad_x(self, y: Tensor) -> Tensor:
        grad_x = getattr(self.base, "grad_x", None)
        x = self.unshift(y)
        return grad_x(x) if grad_x is not None else autograd_energy_grad(self.base, x)

    def accumulate_param_grad(self, points: Tensor, weights: Tensor) -> None:
        accumulate = getattr(self.base, "accumulate_param_grad", None)
        if accumulate is not None:
            accumulate(self.unshift(points.detach()), weights)
        else:  # pragma: no cover - every Potential has it; plain modules take the generic path
            super().accumulate_param_grad(points, weights)
