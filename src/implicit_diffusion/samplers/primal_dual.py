"""Primal-dual Langevin (unadjusted Langevin PDHG) for π ∝ exp(−f(x) − g(Dx)), e.g. total variation.

f is the smooth ``potential`` V (an explicit gradient step), D a linear operator ℝᵈ → ℝᵖ (finite
differences: total variation), g convex and handled through the prox of its convex conjugate g*
(as PDHG does; Moreau: prox_{σg*}(v) = v − σ prox_{g/σ}(v/σ)). With our ULA conventions
(γ = ``step_size``, x − γ∇V + √(2γ)z), dual step σ and over-relaxation θ (1 by default):

    x⁺ = x − γ(∇f(x) + Dᵀy) + √(2γ) z,          z ~ N(0, I),
    y⁺ = prox_{σg*}(y + σ D(x⁺ + θ(x⁺ − x))).

For g = w‖·‖₁ (TV when D is a difference operator) g* is the indicator of {‖y‖_∞ ≤ w} and
prox_{σg*} = clamp(·, −w, w), whatever σ. In the lecture's notation (paper-notes §2), ε = 2γ,
(ε/2)Dᵀũ = γDᵀy, the dual update uses prox_{σg*} where the notes write prox_{λg}, and f takes an
explicit gradient step instead of prox_{λf}. The notes' averaging ũ⁺ = ũ + τ(u⁺ − u) keeps
ũ − τu constant, so from ũ = u = 0 it is ũ = τu: a rescaled dual, left out here (τ = 1).

The chain is biased at finite γ: its x-marginal tends to π as γ → 0 at fixed σ (checked on a
quadratic g, where the chain is linear-Gaussian and its stationary law solves a discrete Lyapunov
equation, tests/test_primal_dual.py). On the 2-D TV test problem there (f = ½‖x − μ‖²,
g = |x₂ − x₁|, γ = 0.01, σ = 5), measured with n = 400000 chains: E|x₂ − x₁| 0.6731 vs 0.6594
exact (quadrature), Var(x₂ − x₁) 0.759 vs 0.739, i.e. biases +0.014 and +0.020 (± 0.001, 0.002).
At fixed γ the bias depends on σ: on that problem σ = 1 gave +0.024/+0.034 and σ = 20 (σγ‖D‖²
= 0.8, near the PDHG limit 1) +0.017/+0.021 (n = 40000–200000).

The dual variable y is extra state: :func:`primal_dual_langevin` returns a
:class:`PrimalDualLangevin` step object holding y for the current particle batch. It has the
shared Langevin signature, so ``SingleLoop(..., sampler=step)`` and ``NestedLoop`` take it
unchanged; y restarts at zero when the batch shape, dtype or device changes, or on ``reset()``.
NestedLoop's restart of the particles (same batch shape) does not reset y: for fresh duals at
every θ update, pass ``callbacks=[lambda k, x, stats: step.reset()]`` to ``NestedLoop.run``.
y is carried detached (like the particles across iterations): a step with grad on is
differentiable w.r.t. x and θ through the current step only.

References: Burger, Ehrhardt, Kuger & Weigand 2024, "Analysis of primal-dual Langevin
algorithms" (arXiv 2405.18098), the ULPDA with explicit f; Narnhofer, Habring, Holler & Pock
2024, "Posterior-variance-based error quantification for inverse problems in imaging", SIAM J.
Imaging Sci.; Chambolle & Pock 2011 (PDHG).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .langevin import LangevinInfo, check_step_size, draw_noise, energy_grad

__all__ = [
    "LinearOperator",
    "PrimalDualLangevin",
    "dense_operator",
    "finite_difference_1d",
    "finite_difference_2d",
    "l1_dual_prox",
    "primal_dual_langevin",
    "quadratic_dual_prox",
]

DualProx = Callable[[Tensor, float], Tensor]


class LinearOperator(NamedTuple):
    """D: ℝᵈ → ℝᵖ on batches: ``apply(x (N, d)) -> (N, p)``, ``adjoint(y (N, p)) -> (N, d)`` (Dᵀ);
    ``norm_bound`` ≥ ‖D‖₂ (the PDHG stability condition reads σγ‖D‖² < 1)."""

    apply: Callable[[Tensor], Tensor]
    adjoint: Callable[[Tensor], Tensor]
    in_dim: int
    out_dim: int
    norm_bound: float


def _check_size(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return n


def finite_difference_1d(d: int) -> LinearOperator:
    """Forward differences (Dx)_i = x_{i+1} − x_i, i = 0..d−2: the (d−1)×d TV operator, ‖D‖ ≤ 2.

    Example:
        >>> D = finite_difference_1d(3)
        >>> D.apply(torch.tensor([[1.0, 4.0, 2.0]])).tolist(), D.adjoint(torch.tensor([[1.0, 1.0]])).tolist()
        ([[3.0, -2.0]], [[-1.0, 0.0, 1.0]])
    """
    if _check_size("d", d) < 2:
        raise ValueError(f"d must be >= 2 for differences, got {d}")

    def adjoint(y: Tensor) -> Tensor:  # (Dᵀy)_j = y_{j−1} − y_j, with y_{−1} = y_{d−1} = 0
        pad = y.new_zeros(y.shape[0], 1)
        return torch.cat([pad, y], 1) - torch.cat([y, pad], 1)

    return LinearOperator(lambda x: x[:, 1:] - x[:, :-1], adjoint, d, d - 1, 2.0)


def finite_difference_2d(h: int, w: int) -> LinearOperator:
    """Anisotropic TV differences of images flattened row-major to ``(N, h·w)``: horizontal
    x[r, c+1] − x[r, c] (h(w−1) entries) then vertical x[r+1, c] − x[r, c] ((h−1)w entries);
    ‖D‖ ≤ √8. ``h`` or ``w`` may be 1 (then it is :func:`finite_difference_1d`'s operator)."""
    _check_size("h", h), _check_size("w", w)
    if h * w < 2:
        raise ValueError(f"an image needs at least 2 pixels for differences, got h={h}, w={w}")
    nh, nv = h * (w - 1), (h - 1) * w

    def apply(x: Tensor) -> Tensor:
        img = x.reshape(x.shape[0], h, w)
        dh, dv = img[:, :, 1:] - img[:, :, :-1], img[:, 1:, :] - img[:, :-1, :]
        return torch.cat([dh.reshape(x.shape[0], nh), dv.reshape(x.shape[0], nv)], 1)

    def adjoint(y: Tensor) -> Tensor:
        n = y.shape[0]
        yh, yv = y[:, :nh].reshape(n, h, w - 1), y[:, nh:].reshape(n, h - 1, w)
        out = y.new_zeros(n, h, w)
        out[:, :, 1:] += yh
        out[:, :, :-1] -= yh
        out[:, 1:, :] += yv
        out[:, :-1, :] -= yv
        return out.reshape(n, h * w)

    return LinearOperator(apply, adjoint, h * w, nh + nv, math.sqrt(8.0))


def dense_operator(K: Tensor) -> LinearOperator:
    """D = K for a dense ``(p, d)`` matrix (rows of x: x Kᵀ; Dᵀy: y K)."""
    K = torch.as_tensor(K).detach()
    if K.ndim != 2 or K.numel() == 0 or not torch.isfinite(K).all():
        raise ValueError(f"K must be a finite, non-empty (p, d) matrix, got shape {tuple(K.shape)}")
    norm = float(torch.linalg.matrix_norm(K.double(), ord=2))
    return LinearOperator(lambda x: x @ K.to(x).T, lambda y: y @ K.to(y), K.shape[1], K.shape[0], norm)


def l1_dual_prox(weight: float) -> DualProx:
    """prox_{σg*} for g = weight·‖·‖₁: the projection clamp(y, −weight, weight) (any σ)."""
    weight = float(weight)
    if not weight > 0 or not math.isfinite(weight):
        raise ValueError(f"tv_weight (the weight w of g = w‖·‖₁) must be a finite number > 0, got {weight}")
    return lambda y, sigma: torch.clamp(y, -weight, weight)


def quadratic_dual_prox(alpha: float) -> DualProx:
    """prox_{σg*} for g(v) = (α/2)‖v‖² (g*(y) = ‖y‖²/(2α)): y ↦ y·α/(α + σ)."""
    alpha = float(alpha)
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return lambda y, sigma: y * (alpha / (alpha + sigma))


class PrimalDualLangevin:
    """The primal-dual Langevin step (see the module docstring), holding the dual iterate.

    ``step(x, potential, *, step_size, generator=None, noise=None) -> (x⁺, LangevinInfo())``;
    ``x``, ``noise``: ``(N, d)``; ``dual``: the current y ``(N, p)`` (``None`` before the first step
    or after ``reset()``). Build it with :func:`primal_dual_langevin`.
    """

    def __init__(self, D: LinearOperator, dual_prox: DualProx, dual_step: float, overrelaxation: float = 1.0):
        if not isinstance(D, LinearOperator):
            raise ValueError(f"D must be a LinearOperator (finite_difference_1d/2d, dense_operator), got {type(D)}")
        if not (dual_step > 0 and math.isfinite(dual_step)):
            raise ValueError(f"dual_step (σ) must be a finite number > 0, got {dual_step!r}")
        if not 0 <= overrelaxation <= 1:
            raise ValueError(f"overrelaxation (θ) must lie in [0, 1], got {overrelaxation!r}")
        self.D, self.dual_prox = D, dual_prox
        self.dual_step, self.overrelaxation = float(dual_step), float(overrelaxation)
        self.dual: Tensor | None = None

    def reset(self) -> None:
        """Forget the dual iterate: the next step starts from y = 0."""
        self.dual = None

    def __call__(
        self,
        x: Tensor,
        potential,
        *,
        step_size: float,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, LangevinInfo]:
        check_step_size(step_size)
        d, p = self.D.in_dim, self.D.out_dim
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (num_particles, {d}) to match D's input size, got {tuple(x.shape)}")
        y = self.dual
        if y is None or y.shape[0] != x.shape[0] or y.dtype != x.dtype or y.device != x.device:
            y = x.new_zeros(x.shape[0], p)
        z = draw_noise(x, noise, generator)
        g = energy_grad(potential, x)
        x_next = x - step_size * (g + self.D.adjoint(y)) + math.sqrt(2.0 * step_size) * z
        # The dual is carried as a constant (detached), like particles across iterations.
        with torch.no_grad():
            xd, xn = x.detach(), x_next.detach()
            bar = xn + self.overrelaxation * (xn - xd)
            self.dual = self.dual_prox(y + self.dual_step * self.D.apply(bar), self.dual_step)
        return x_next, LangevinInfo()


def primal_dual_langevin(
    D: LinearOperator,
    tv_weight: float | None = None,
    *,
    dual_step: float = 1.0,
    dual_prox: DualProx | None = None,
    overrelaxation: float = 1.0,
) -> PrimalDualLangevin:
    """A primal-dual Langevin step for π ∝ exp(−V(x) − g(Dx)), g = ``tv_weight``·‖·‖₁ (or any g
    given by ``dual_prox(y, σ) = prox_{σg*}(y)``; exactly one of the two):

        x⁺ = x − γ(∇V(x) + Dᵀy) + √(2γ) z,   y⁺ = prox_{σg*}(y + σ D(x⁺ + θ(x⁺ − x))),

    σ = ``dual_step``, θ = ``overrelaxation`` (1: PDHG / Chambolle–Pock; 0: Arrow–Hurwicz, more
    biased). Shapes: x ``(N, D.in_dim)``, y ``(N, D.out_dim)``. The returned object carries y
    between calls; ``reset()`` starts it over (see the module docstring).

    Example:
        >>> from implicit_diffusion.models import GaussianPotential
        >>> step = primal_dual_langevin(finite_difference_1d(3), tv_weight=1.0, dual_step=0.5)
        >>> x = torch.tensor([[0.0, 1.0, 3.0]])
        >>> x1, _ = step(x, GaussianPotential(torch.zeros(3)), step_size=0.1, noise=torch.zeros(1, 3))
        >>> x1.tolist(), step.dual.tolist()  # y⁺ = clamp(0.5·D(2x⁺ − x), −1, 1) = 0.5·(0.8, 1.6)
        ([[0.0, 0.8999999761581421, 2.700000047683716]], [[0.3999999761581421, 0.8000000715255737]])
    """
    if (tv_weight is None) == (dual_prox is None):
        raise ValueError("give exactly one of tv_weight (g = w‖·‖₁) and dual_prox (prox_{σg*} of another g)")
    prox = l1_dual_prox(tv_weight) if tv_weight is not None else dual_prox
    return PrimalDualLangevin(D, prox, dual_step, overrelaxation)
