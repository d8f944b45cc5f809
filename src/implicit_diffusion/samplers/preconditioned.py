"""Preconditioned Langevin with a fixed SPD preconditioner P (constant-metric Riemannian Langevin).

    x' = x − γ P ∇V(x) + √(2γ) L z,   z ~ N(0, I),   P = L Lᵀ,

leaves π ∝ exp(−V) invariant in the continuous-time limit (a ULA-type discretisation bias
remains). The noise √(2γ) L z has covariance 2γP; any square root S with S Sᵀ = P (Cholesky,
symmetric P^{1/2}, ...) gives the same law, and the Cholesky factor is the cheapest.

Reference: Girolami & Calderhead 2011, JRSS-B 73(2), §5 (constant metric); Roberts & Stramer
2002, "Langevin diffusions and Metropolis-Hastings algorithms", Methodol. Comput. Appl. Probab. 4.

:func:`inverse_hessian` builds a Laplace-type P = (mean Hessian of V)⁻¹ from a set of points, to
plug into :func:`preconditioned_langevin` as a fixed metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_values
from .langevin import LangevinInfo, check_step_size, draw_noise, energy_grad

__all__ = ["inverse_hessian", "preconditioned_langevin"]

Step = Callable[..., tuple[Tensor, LangevinInfo]]


def _check_preconditioner(P: Tensor) -> tuple[Tensor, Tensor]:
    """(P, noise factor): the factor is √P for a diagonal ``(d,)`` P, Cholesky L for ``(d, d)``."""
    if not P.is_floating_point():
        P = P.to(torch.get_default_dtype())
    if P.ndim == 0 or P.ndim > 2 or P.numel() == 0 or not torch.isfinite(P).all():
        raise ValueError(f"P must be a finite (d,) positive vector or (d, d) SPD matrix, got shape {tuple(P.shape)}")
    if P.ndim == 1:
        if not (P > 0).all():
            raise ValueError(f"a diagonal preconditioner P must be > 0 elementwise, got {P.tolist()}")
        return P, P.sqrt()
    if P.shape[0] != P.shape[1]:
        raise ValueError(f"a matrix preconditioner P must be square (d, d), got shape {tuple(P.shape)}")
    asym = float((P - P.T).abs().max())
    if asym > 1e-6 * float(P.abs().max()):
        raise ValueError(f"P must be symmetric: max |P − Pᵀ| = {asym:.3g} exceeds 1e-6·max |P|")
    P = 0.5 * (P + P.T)  # exactly symmetric, so P and L describe the same matrix
    L, info = torch.linalg.cholesky_ex(P)
    if int(info) != 0:
        raise ValueError(f"P must be positive definite: its Cholesky factorisation fails at column {int(info)}")
    return P, L


def preconditioned_langevin(P: Tensor) -> Step:
    """A Langevin step with fixed preconditioner P, with the shared signature of ``ula_step``.

    ``P``: a ``(d, d)`` symmetric positive-definite matrix, or a ``(d,)`` positive vector read
    as diag(P) and applied elementwise (O(d) per particle instead of O(d²)). Validated and
    factorised once here; the returned ``step(x, potential, *, step_size, generator=None,
    noise=None) -> (x_next, LangevinInfo())`` applies, for ``x`` of shape ``(num_particles, d)``,

        x' = x − γ P ∇V(x) + √(2γ) L z,   P = L Lᵀ,  z ~ N(0, I) (``noise`` or ``generator``).

    With P = Σ on V(x) = ½(x − μ)ᵀΣ⁻¹(x − μ) the step contracts x − μ by (1 − γ) in every
    direction, however ill-conditioned Σ is; P = I is ``ula_step``.

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> step = preconditioned_langevin(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
        >>> x1, _ = step(torch.ones(3, 2), GaussianPotential(torch.zeros(2)), step_size=0.1,
        ...              noise=torch.zeros(3, 2))
        >>> [round(v, 6) for v in x1[0].tolist()]  # x − 0.1·P x
        [0.75, 0.85]
    """
    P, factor = _check_preconditioner(torch.as_tensor(P).detach())
    d, diagonal = P.shape[0], P.ndim == 1
    kind = f"diagonal ({d},)" if diagonal else f"matrix ({d}, {d})"

    def step(
        x: Tensor,
        potential,
        *,
        step_size: float,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, LangevinInfo]:
        check_step_size(step_size)
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (num_particles, {d}) to match P's dimension {d}, got {tuple(x.shape)}")
        z = draw_noise(x, noise, generator)
        g = energy_grad(potential, x)
        Px, Fx = P.to(x), factor.to(x)
        if diagonal:
            drift, diffusion = g * Px, z * Fx
        else:  # rows: (P g)ᵀ = gᵀP (P symmetric) and (L z)ᵀ = zᵀLᵀ
            drift, diffusion = g @ Px, z @ Fx.T
        return x - step_size * drift + math.sqrt(2.0 * step_size) * diffusion, LangevinInfo()

    step.__name__ = step.__qualname__ = "preconditioned_langevin_step"
    step.__doc__ = (
        f"Preconditioned Langevin step with a fixed {kind} preconditioner P:\n\n"
        "    x' = x − γ P ∇V(x) + √(2γ) L z,   P = L Lᵀ,   z ~ N(0, I).\n"
    )
    step.preconditioner = P  # type: ignore[attr-defined]
    return step


def inverse_hessian(potential, x: Tensor, *, min_eigenvalue: float = 1e-3) -> Tensor:
    """P = H̄₊⁻¹: the inverse of the mean Hessian of V over the given points, eigenvalues floored.

        H̄ = (1/n) Σᵢ ∇²V(xᵢ)  (symmetrised),   H̄ = Q diag(λ) Qᵀ,   P = Q diag(1/max(λ, λ_min)) Qᵀ.

    ``x``: ``(n, d)`` points (e.g. the current particles) or one point ``(d,)``; ``potential(x) ->
    (n,)`` with V(xᵢ) depending on xᵢ only, differentiable twice by autograd (d backward passes).
    ``min_eigenvalue`` λ_min > 0 keeps P symmetric positive definite where V is not convex (its
    eigenvalues are then ≤ 1/λ_min). Returns a detached ``(d, d)`` tensor in x's dtype, for
    ``preconditioned_langevin(P)``.

    This is a *fixed* (Laplace-type) metric: recompute it between runs if you like, but a
    position-dependent P(x) inside the step would need the divergence correction
    Σⱼ ∂ⱼP_ij(x) in the drift (Girolami & Calderhead 2011, §5; Xifara et al. 2014) to keep π invariant,
    which ``preconditioned_langevin`` does not add.

    Example:
        >>> from implicit_diffusion.models import GaussianPotential
        >>> inverse_hessian(GaussianPotential(torch.zeros(2)), torch.zeros(2)).tolist()  # V = ½‖x‖²
        [[1.0, 0.0], [0.0, 1.0]]
    """
    min_eigenvalue = float(min_eigenvalue)
    if not (min_eigenvalue > 0 and math.isfinite(min_eigenvalue)):
        raise ValueError(f"min_eigenvalue must be a finite number > 0, got {min_eigenvalue}")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be one point (d,) or a non-empty batch (n, d), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite: it holds NaN or inf entries")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        name = f"potential {callable_name(potential)}"
        energies = check_values(name, call_user(name, potential, xr), xr)
        (g,) = torch.autograd.grad(energies.sum(), xr, create_graph=True)
        rows = []
        for j in range(x.shape[1]):  # row j of every ∇²V(xᵢ): ∂/∂xᵢ of (∇V(xᵢ))_j
            h = None
            if g.requires_grad:  # else V is affine in x: ∇V is constant, ∇²V = 0
                (h,) = torch.autograd.grad(g[:, j].sum(), xr, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if h is None else h)
    H = torch.stack(rows, 1).mean(0).detach()  # (d, d): the mean over the n points
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian of the potential is not finite at the given points")
    evals, Q = torch.linalg.eigh(0.5 * (H + H.T))
    P = (Q / evals.clamp(min=min_eigenvalue)) @ Q.T
    return 0.5 * (P + P.T)
