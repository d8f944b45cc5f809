"""Langevin samplers for Gibbs targets π ∝ exp(−V(x, θ)).

Every step here shares one signature, so the algorithms take any of them unchanged::

    step(x, potential, *, step_size, generator=None, noise=None) -> (x_next, info)

``x`` has shape ``(num_particles, dim)``; ``potential`` is a
:class:`~implicit_diffusion.models.Potential` (or any callable ``V(x) -> (num_particles,)``);
``step_size`` is a float given per call, so schedules are the caller's; randomness comes
from ``noise`` (pre-drawn, same shape as ``x``) or else from ``generator``, never from the
global RNG. Grad mode belongs to the caller: under ``torch.no_grad()`` a step is a plain
update; with grad mode on it is differentiable w.r.t. x and θ.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.potentials import autograd_energy_grad

__all__ = ["LangevinInfo", "ula_step", "langevin_chain", "check_step_size", "draw_noise", "energy_grad"]


class LangevinInfo(NamedTuple):
    """What a Langevin step reports. ``acceptance_rate`` is ``None`` for unadjusted steps."""

    acceptance_rate: Tensor | None = None


_ULA_INFO = LangevinInfo()


def energy_grad(potential, x: Tensor) -> Tensor:
    """∇ₓV(x), using ``potential.grad_x`` when it has one, autograd otherwise."""
    grad_x = getattr(potential, "grad_x", None)
    return grad_x(x) if grad_x is not None else autograd_energy_grad(potential, x)


def check_step_size(step_size: float) -> None:
    """The family's common check: γ must be > 0 (NaN fails too)."""
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")


def draw_noise(x: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``: ``noise`` if given, else drawn from ``generator``.

    One of the two is required: library code never draws from the global RNG.
    """
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the particles' shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        return noise
    if generator is None:
        raise ValueError(
            "a sampler step needs randomness: pass generator=torch.Generator().manual_seed(...) or noise=..."
        )
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ula_step(
    x: Tensor,
    potential,
    *,
    step_size: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, LangevinInfo]:
    """One unadjusted Langevin (ULA) step.

    x_{k+1} = x_k − γ ∇ₓV(x_k, θ) + √(2γ) n_k,   n_k ~ N(0, I),

    with γ = ``step_size``. Shapes: ``x`` and ``noise`` ``(num_particles, dim)``.
    Reference: Marion et al. 2024, §2 (Langevin dynamics); Roberts & Tweedie 1996.

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> V = GaussianPotential(torch.zeros(2))
        >>> x = torch.ones(3, 2)
        >>> x1, _ = ula_step(x, V, step_size=0.1, noise=torch.zeros(3, 2))
        >>> x1[0].tolist()  # x − 0.1·x
        [0.8999999761581421, 0.8999999761581421]
    """
    check_step_size(step_size)
    n = draw_noise(x, noise, generator)
    g = energy_grad(potential, x)
    return torch.add(x, g, alpha=-step_size).add_(n, alpha=math.sqrt(2.0 * step_size)), _ULA_INFO


def langevin_chain(x: Tensor, potential, num_steps: int, *, step_size: float, generator: torch.Generator,
                   step=ula_step) -> Tensor:
    """``num_steps`` steps of a Langevin-family ``step`` (ULA by default) from ``x``; returns the
    last state, shape of ``x``. Autograd follows the caller's grad mode (wrap in ``torch.no_grad()``
    for plain sampling).

    >>> from implicit_diffusion.models import GaussianPotential
    >>> g = torch.Generator().manual_seed(0)
    >>> with torch.no_grad():
    ...     x = langevin_chain(torch.zeros(4000, 1), GaussianPotential(torch.zeros(1)), 200, step_size=0.1,
    ...                        generator=g)
    >>> round(float(x.var()), 1)  # ULA's stationary variance 1/(1 − γ/2) ≈ 1.05 for N(0, 1)
    1.0
    """
    for _ in range(num_steps):
        x, _ = step(x, potential, step_size=step_size, generator=generator)
    return x
