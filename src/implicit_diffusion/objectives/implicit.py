"""Implicit differentiation of an inner argmin: Hessian-vector products, conjugate gradient, Γ.

Bilevel problem (Ghadimi & Wang 2018; Arbel & Mairal 2022; Marion et al. 2024, §1):

    min_θ ℓ(θ) = f(x*(θ)),    x*(θ) = argmin_x g(x, θ)    (g strongly convex in x).

The implicit function theorem gives

    ∇ℓ(θ) = −∂²_{θx} g(x*, θ)ᵀ v,    ∇²_{xx} g(x*, θ) v = ∇f(x*).

The estimator Γ(x, θ) evaluates this formula at the *current* iterate x instead of x*, with v
from a few conjugate-gradient (CG) steps on Hessian-vector products (no dense Hessian). It is
the gradient of a surrogate with x and v held fixed:

    Γ(x, θ) = ∇θ [ −⟨∇ₓ g(x, θ), v⟩ ].

Shapes: x and v share one shape (any, e.g. ``(dim,)``); θ is any tensor; ``inner_loss(x, θ)``
and ``outer_loss(x)`` return 0-d tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CGResult", "Linearization", "conjugate_gradient", "hessian_vector_product", "implicit_surrogate",
           "inner_gradient", "linearize", "outer_gradient"]

InnerLoss = Callable[[Tensor, Tensor], Tensor]  # g(x, θ) -> 0-d
OuterLoss = Callable[[Tensor], Tensor]  # f(x) -> 0-d


class CGResult(NamedTuple):
    """``solution`` of A v = b, CG ``iterations`` run, final ``residual_norm`` ‖b − A v‖ and
    ``matvecs`` (products with A, counting the one that forms the initial residual)."""

    solution: Tensor
    iterations: int
    residual_norm: float
    matvecs: int


def inner_gradient(inner_loss: InnerLoss, x: Tensor, theta: Tensor) -> Tensor:
    """∇ₓ g(x, θ) at fixed θ, without autograd history (same shape as x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(inner_loss(x, theta.detach()), x)
    return grad


def outer_gradient(outer_loss: OuterLoss, x: Tensor) -> Tensor:
    """∇f(x), without autograd history (same shape as x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(outer_loss(x), x)
    return grad


def hessian_vector_product(inner_loss: InnerLoss, x: Tensor, theta: Tensor, v: Tensor) -> Tensor:
    """∇²_{xx} g(x, θ) v by double backward (one extra backward pass, no dense Hessian).

    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> g = lambda x, th: 0.5 * x @ A @ x + th.exp() * x.sum()
    >>> x, v = torch.ones(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> hessian_vector_product(g, x, torch.zeros(()), v)
    tensor([2., 1.], dtype=torch.float64)
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(inner_loss(x, theta.detach()), x, create_graph=True)
        (hv,) = torch.autograd.grad(grad, x, grad_outputs=v.detach())
    return hv


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    max_iter: int,
    tol: float = 0.0,
) -> CGResult:
    """Solve A v = b for symmetric positive-definite A given as ``matvec`` (Hestenes & Stiefel 1952).

    Runs at most ``max_iter`` CG steps from ``x0`` (zero if None), stopping early once
    ‖b − A v‖ ≤ ``tol``. From x0 = 0 the first residual is b itself (no product spent); a warm
    start costs one product for r₀ = b − A x0. ``max_iter = 0`` returns x0 (useful to count).

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), max_iter=2)
    >>> torch.allclose(A @ res.solution, torch.tensor([1.0, 2.0], dtype=torch.float64)), res.iterations
    (True, 2)
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    b = b.detach()
    if x0 is None:
        v, r, matvecs = torch.zeros_like(b), b.clone(), 0
    else:
        v = x0.detach().clone()
        r, matvecs = b - matvec(v), 1
    rr = torch.sum(r * r)
    p = r.clone()
    it = 0
    while it < max_iter and float(rr.sqrt()) > tol:
        ap = matvec(p)
        matvecs += 1
        pap = torch.sum(p * ap)
        if not float(pap) > 0:  # A not positive definite along p (or p = 0 exactly): stop, keep v
            break
        alpha = rr / pap
        v = v + alpha * p
        r = r - alpha * ap
        rr_new = torch.sum(r * r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return CGResult(v, it, float(rr.sqrt()), matvecs)


class Linearization:
    """∇ₓg(x, θ) with its autograd graph, built once and shared by every HVP and the surrogate at (x, θ).

    ``grad`` is ∇ₓg (detached); ``hvp(v)`` is ∇²ₓₓg v (one backward pass through the kept graph, no
    new forward); ``surrogate(v)`` is −⟨∇ₓg(x, θ), v⟩ with x, v fixed, whose θ-gradient is Γ. Same
    values as :func:`hessian_vector_product` and :func:`implicit_surrogate`, at about half the cost
    when several products are taken at one point.
    """

    def __init__(self, inner_loss: InnerLoss, x: Tensor, theta: Tensor):
        with torch.enable_grad():
            self._x = x.detach().requires_grad_(True)
            (self._grad,) = torch.autograd.grad(inner_loss(self._x, theta), self._x, create_graph=True)
        self.grad = self._grad.detach()

    def hvp(self, v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(self._grad, self._x, grad_outputs=v.detach(), retain_graph=True)
        return hv

    def surrogate(self, v: Tensor) -> Tensor:
        return -torch.sum(self._grad * v.detach())


def linearize(inner_loss: InnerLoss, x: Tensor, theta: Tensor) -> Linearization:
    """:class:`Linearization` of g at (x, θ); θ stays in the graph (for the surrogate's θ-gradient)."""
    return Linearization(inner_loss, x, theta)


def implicit_surrogate(inner_loss: InnerLoss, x: Tensor, theta: Tensor, v: Tensor) -> Tensor:
    """The 0-d surrogate −⟨∇ₓ g(x, θ), v⟩ whose θ-gradient is Γ(x, θ) = −∂²_{θx} g(x, θ)ᵀ v.

    x and v are held fixed (detached); the graph reaches θ only, so ``.backward()`` writes Γ
    into ``theta.grad`` and any ``torch.optim`` optimizer can take the step.
    """
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(inner_loss(xr, theta), xr, create_graph=True)
        return -torch.sum(grad * v.detach())
