"""The Langevin-family samplers by name (the experiments' config key ``sampler``).

Every choice is a step with the shared signature ``step(x, potential, *, step_size, generator)``
run unchanged by :class:`~implicit_diffusion.algorithms.SingleLoop`; what differs is only how
it is set up on a target π*(θ) on ℝ² (the settings below are those of the §5.1 hexagon target):

- ``ula``: x' = x − γ∇V + √(2γ) z.
- ``mala``: ULA proposal + Metropolis–Hastings accept/reject (exact invariant law).
- ``preconditioned``: a fixed P = (mean Hessian of a reference potential V(·, θ₀) at given points)⁻¹,
  eigenvalues floored at 0.5 (:func:`~implicit_diffusion.samplers.inverse_hessian`); on §5.1 (the
  six centres, unit-variance components) P ≈ I, so this is close to ULA: the option shows the plumbing.
- ``myula-box``: proximal Langevin with g the indicator of the box [−b, b]², b = ``box`` (10 by
  default: π*(θ) has mass < 1e-9 outside it, so the target is unchanged); λ = ``box_lam``.
- ``primal-dual-box``: primal-dual Langevin for exp(−V(x) − g(Dx)) with D = I and g the same box
  indicator, through prox_{σg*}(y) = soft-threshold(y, σb) (g* = b‖·‖₁), dual step σ = 1.
- ``mirror-orthant``: mirror Langevin on the positive orthant with the entropic mirror map, run
  on the target translated by s = (``mirror_shift``, ``mirror_shift``) (10: mass outside
  the translated orthant < 1e-9); particles are mapped back by −s. In the dual coordinates
  y = log x the drift is scaled by x, so the dual step size is γ/s², which makes the primal
  step γ at the translated origin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.shifted import ShiftedPotential
from .langevin import ula_step
from .mala import mala_step
from .mirror import mirror_langevin
from .preconditioned import inverse_hessian, preconditioned_langevin
from .primal_dual import dense_operator, primal_dual_langevin
from .proximal import myula_box, prox_l1

__all__ = ["LANGEVIN_SAMPLERS", "SamplerSetup", "sampler_setup"]

LANGEVIN_SAMPLERS = ("ula", "mala", "preconditioned", "myula-box", "primal-dual-box", "mirror-orthant")


class SamplerSetup(NamedTuple):
    """A step with the Langevin family's signature, the γ it is called with, and the translation
    s of the sampler's coordinates (particles are x + s while sampling; 0 for most samplers)."""

    step: Callable
    step_size: float
    shift: float = 0.0

    def translate(self, potential, reward_fn: Callable[[Tensor], Tensor],
                  dtype: torch.dtype) -> tuple[object, Callable[[Tensor], Tensor]]:
        """The potential and the reward in the sampler's coordinates: V_s(y) = V(y − s) and
        R(y − s) (:class:`~implicit_diffusion.models.ShiftedPotential` in ``dtype``, sharing θ),
        or both unchanged when s = 0."""
        if not self.shift:
            return potential, reward_fn
        shifted = ShiftedPotential(potential, self.shift).to(dtype)

        def translated_reward(y: Tensor) -> Tensor:
            return reward_fn(shifted.unshift(y))

        translated_reward.__name__ = f"{getattr(reward_fn, '__name__', 'reward')} (translated)"
        return shifted, translated_reward


def sampler_setup(name: str, step_size: float, *, reference=None, reference_points: Tensor | None = None,
                  box: float = 10.0, box_lam: float = 1.0, mirror_shift: float = 10.0) -> SamplerSetup:
    """The step for ``name`` (one of :data:`LANGEVIN_SAMPLERS`) at the experiment's γ = ``step_size``.

    ``reference`` (a potential) and ``reference_points`` ``(n, 2)``: where the ``preconditioned``
    sampler's fixed P is computed (the inverse mean Hessian of ``reference`` at those points)."""
    if name == "ula":
        return SamplerSetup(ula_step, step_size)
    if name == "mala":
        return SamplerSetup(mala_step, step_size)
    if name == "preconditioned":
        if reference is None or reference_points is None:
            raise ValueError("sampler 'preconditioned' needs a reference potential and reference_points")
        P = inverse_hessian(reference, reference_points, min_eigenvalue=0.5)
        return SamplerSetup(preconditioned_langevin(P), step_size)
    if name == "myula-box":
        return SamplerSetup(myula_box(-box, box, box_lam), step_size)
    if name == "primal-dual-box":
        step = primal_dual_langevin(dense_operator(torch.eye(2)), dual_prox=lambda y, sigma: prox_l1(y, sigma, box),
                                    dual_step=1.0)
        return SamplerSetup(step, step_size)
    if name == "mirror-orthant":
        return SamplerSetup(mirror_langevin("orthant"), step_size / mirror_shift**2, mirror_shift)
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(LANGEVIN_SAMPLERS)}")
