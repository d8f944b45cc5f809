"""Metropolis-adjusted Langevin (MALA): a ULA proposal corrected by an accept/reject step.

Same signature as :func:`~implicit_diffusion.samplers.langevin.ula_step`, plus an optional
``uniform`` for the accept/reject draw, so the algorithms take it unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_values
from .langevin import LangevinInfo, check_step_size, draw_noise, energy_grad

__all__ = ["mala_step"]


def mala_step(
    x: Tensor,
    potential,
    *,
    step_size: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    uniform: Tensor | None = None,
) -> tuple[Tensor, LangevinInfo]:
    """One Metropolis-adjusted Langevin (MALA) step, targeting π ∝ exp(−V) exactly.

    Proposal (a ULA step), with γ = ``step_size`` and z ~ N(0, I):

        y = x − γ ∇V(x) + √(2γ) z,   q(y | x) = N(y; x − γ∇V(x), 2γI),

    accepted per particle when u ≤ α and α > 0, u ~ U[0, 1), with

        log α = min(0, −V(y) + V(x) + log q(x | y) − log q(y | x)),
        log q(y | x) = −‖y − x + γ∇V(x)‖² / (4γ) + const;

    x_next = where(accept, y, x). All in log space, so large energy gaps cannot overflow; a
    proposal with a non-finite energy (α = 0 or NaN) is rejected, whatever u, u = 0 included.

    Randomness: ``noise`` (z, shape ``(num_particles, dim)``) and ``uniform`` (u, shape
    ``(num_particles,)``) when given, else drawn from ``generator`` (z first, then u). A step
    needs both, so pass ``generator`` or both ``noise`` and ``uniform``; ``noise`` alone is an
    error. Grad mode belongs to the caller, as for ULA: the accept/reject decision is not
    differentiable, the selected proposal is. ``info.acceptance_rate`` is the mean acceptance
    probability E[α] over particles (0-d, detached): the Rao-Blackwellised acceptance rate.

    Reference: Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and
    their discrete approximations", Bernoulli 2(4).

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> V = GaussianPotential(torch.zeros(2))
        >>> x = torch.ones(3, 2)
        >>> x1, info = mala_step(x, V, step_size=0.1, noise=torch.zeros(3, 2), uniform=torch.zeros(3))
        >>> x1[0].tolist()  # u = 0 accepts: the ULA proposal x − 0.1·x
        [0.8999999761581421, 0.8999999761581421]
        >>> 0.0 < float(info.acceptance_rate) <= 1.0
        True
    """
    check_step_size(step_size)
    if noise is not None and uniform is None and generator is None:
        raise ValueError(
            "mala_step needs a uniform draw for the accept/reject step as well as the noise: "
            "pass uniform=... (shape (num_particles,), values in [0, 1)) beside noise=..., "
            "or pass generator=torch.Generator().manual_seed(...)"
        )
    z = draw_noise(x, noise, generator)
    if uniform is None:
        uniform = torch.rand(x.shape[:1], generator=generator, dtype=x.dtype, device=x.device)
    elif uniform.shape != x.shape[:1]:
        raise ValueError(f"uniform must have shape ({x.shape[0]},) (one draw per particle), got {tuple(uniform.shape)}")

    name = f"potential {callable_name(potential)}"
    g_x = energy_grad(potential, x)
    y = torch.add(x, g_x, alpha=-step_size).add_(z, alpha=math.sqrt(2.0 * step_size))
    g_y = energy_grad(potential, y)
    # +inf at a proposal is allowed (a hard constraint): such proposals are rejected below
    v_x = check_values(name, call_user(name, potential, x), x, finite=False)
    v_y = check_values(name, call_user(name, potential, y), y, finite=False)
    # log q(y|x) = −‖√(2γ)z‖²/(4γ) = −‖z‖²/2 exactly; using z avoids the cancellation in y − x.
    log_q_fwd = -0.5 * (z**2).sum(-1)
    log_q_bwd = -((x - y + step_size * g_y) ** 2).sum(-1) / (4.0 * step_size)
    log_ratio = (v_x - v_y + log_q_bwd - log_q_fwd).detach()  # the MH decision is not differentiated
    # NaN (non-finite energies) compares False, so such proposals are rejected. α = 0 (log α = −inf:
    # a +inf energy at the proposal, a hard constraint) is never accepted, not even with u = 0,
    # where log u = −inf ≤ −inf would otherwise hold.
    accept = (torch.log(uniform.to(x.dtype)) <= log_ratio) & (log_ratio > -math.inf)
    x_next = torch.where(accept.unsqueeze(-1), y, x)
    alpha = torch.nan_to_num(log_ratio.clamp(max=0.0).exp(), nan=0.0)
    return x_next, LangevinInfo(acceptance_rate=alpha.mean())
