"""Regularised regression on bundled data as a bilevel problem, with exact solutions.

    min_θ ℓ(θ) = f(x*(θ)),  x*(θ) = argmin_x g(x, θ),  g(x, θ) = training loss(x) + (e^θ/2)‖x‖²,

f = validation loss. ``ridge``: scikit-learn's ``load_diabetes`` (442 × 10), squared loss, closed
form x*(θ) = (AᵀA/n + e^θ I)⁻¹Aᵀb/n. ``logistic``: ``load_breast_cancer`` (569 × 30 plus an
unpenalised intercept), logistic loss; x*(θ) by Newton's method to machine precision. Features
(and the ridge target) are standardised with training statistics; the split is random with a seed.
The exact ℓ and ℓ′ (implicit function theorem, dense linear algebra) give the reference optimum θ*
through :func:`minimize_1d`; the bilevel algorithms (:mod:`implicit_diffusion.algorithms.bilevel`)
see only ``inner_loss`` and ``outer_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["PROBLEMS", "Problem", "load_problem", "minimize_1d"]

PROBLEMS = ("ridge", "logistic")


@dataclass
class Problem:
    """Training data (A, b), validation data (A_val, b_val), and which coordinates are penalised."""

    kind: Literal["ridge", "logistic"]
    A: Tensor  # (n, d)
    b: Tensor  # (n,)
    A_val: Tensor  # (m, d)
    b_val: Tensor  # (m,)
    penalized: Tensor  # (d,) 1 for penalised coordinates, 0 for the intercept

    def to(self, device: torch.device | str) -> Problem:
        """The same problem with its tensors on ``device``."""
        return replace(self, A=self.A.to(device), b=self.b.to(device), A_val=self.A_val.to(device),
                       b_val=self.b_val.to(device), penalized=self.penalized.to(device))

    def inner_loss(self, x: Tensor, theta: Tensor) -> Tensor:
        """g(x, θ) = training loss + (e^θ/2)‖x‖² (penalised coordinates)."""
        return _loss(self.kind, self.A, self.b, x) + 0.5 * theta.exp() * (self.penalized * x * x).sum()

    def outer_loss(self, x: Tensor) -> Tensor:
        """f(x) = validation loss (half mean squared error, or mean logistic loss)."""
        return _loss(self.kind, self.A_val, self.b_val, x)

    def curvature_bound(self) -> float:
        """L_data ≥ the largest eigenvalue of the data term's Hessian (AᵀA/n, ×1/4 for logistic)."""
        top = float(torch.linalg.eigvalsh(self.A.T @ self.A / len(self.b))[-1])
        return top if self.kind == "ridge" else top / 4

    def solve(self, theta: float, x0: Tensor | None = None) -> Tensor:
        """x*(θ): closed form (ridge) or Newton's method to ‖step‖∞ ≤ 1e-13 (logistic)."""
        n, d = self.A.shape
        reg = math.exp(theta) * torch.diag(self.penalized)
        if self.kind == "ridge":
            return torch.linalg.solve(self.A.T @ self.A / n + reg, self.A.T @ self.b / n)
        x = torch.zeros(d, dtype=self.A.dtype, device=self.A.device) if x0 is None else x0.clone()
        for _ in range(100):
            s = torch.sigmoid(self.A @ x)
            grad = self.A.T @ (s - self.b) / n + reg @ x
            hess = (self.A * (s * (1 - s))[:, None]).T @ self.A / n + reg
            dx = torch.linalg.solve(hess, grad)
            x = x - dx
            if float(dx.abs().max()) <= 1e-13:
                break
        return x

    def value(self, theta: float, x0: Tensor | None = None) -> float:
        """ℓ(θ) = f(x*(θ))."""
        return float(self.outer_loss(self.solve(theta, x0)))

    def derivative(self, theta: float) -> float:
        """ℓ'(θ) = −e^θ (m∘x*)ᵀ H⁻¹ ∇f(x*) with the dense Hessian H = ∇²ₓₓg(x*, θ)
        (implicit function theorem; m the penalty mask, since ∂θ∇ₓg = e^θ m∘x)."""
        x = self.solve(theta)
        n = len(self.b)
        if self.kind == "ridge":
            data_hess = self.A.T @ self.A / n
            grad_f = self.A_val.T @ (self.A_val @ x - self.b_val) / len(self.b_val)
        else:
            s = torch.sigmoid(self.A @ x)
            data_hess = (self.A * (s * (1 - s))[:, None]).T @ self.A / n
            grad_f = self.A_val.T @ (torch.sigmoid(self.A_val @ x) - self.b_val) / len(self.b_val)
        hess = data_hess + math.exp(theta) * torch.diag(self.penalized)
        return float(-math.exp(theta) * (self.penalized * x) @ torch.linalg.solve(hess, grad_f))


def _loss(kind: str, A: Tensor, b: Tensor, x: Tensor) -> Tensor:
    z = A @ x
    if kind == "ridge":
        return 0.5 * ((z - b) ** 2).mean()
    return (torch.nn.functional.softplus(z) - b * z).mean()


def load_problem(kind: Literal["ridge", "logistic"], *, train_fraction: float = 0.5, seed: int = 0) -> Problem:
    """The bundled data set of ``kind``, split at random (``seed``), standardised with training statistics."""
    from sklearn.datasets import load_breast_cancer, load_diabetes

    if kind not in PROBLEMS:
        raise ValueError(f"problem must be 'ridge' or 'logistic', got {kind!r}")
    X, y = (load_diabetes if kind == "ridge" else load_breast_cancer)(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n = int(round(train_fraction * len(y)))
    tr, va = perm[:n], perm[n:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    A, A_val = (X[tr] - mu) / sd, (X[va] - mu) / sd
    b, b_val = y[tr].astype(np.float64), y[va].astype(np.float64)
    penalized = np.ones(X.shape[1])
    if kind == "ridge":  # centred target: no intercept needed
        b, b_val = (b - b.mean()) / b.std(), (b_val - b.mean()) / b.std()
    else:  # unpenalised intercept column
        A, A_val = np.c_[A, np.ones(len(tr))], np.c_[A_val, np.ones(len(va))]
        penalized = np.r_[penalized, 0.0]
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return Problem(kind, t(A), t(b), t(A_val), t(b_val), t(penalized))


def minimize_1d(fn: Callable[[float], float], lo: float, hi: float, points: int = 361, *, tol: float = 1e-10,
                derivative: Callable[[float], float] | None = None) -> float:
    """argmin of ``fn`` on [lo, hi]: the best of ``points`` grid values, refined on the bracket of its
    two neighbours by bisection on the sign of ``derivative`` when given, else by golden-section search
    (to ``tol`` in the argument). Values alone locate a minimum only to about √(ε|fn|/fn''), 1e-7
    for ridge here (float64 rounding on a flat minimum); the derivative locates it to ``tol``.

    >>> round(minimize_1d(lambda t: (t - 0.3) ** 2, -2.0, 2.0, 41), 8)
    0.3
    >>> t = minimize_1d(lambda t: (t - 0.3) ** 2, -2.0, 2.0, 41, derivative=lambda t: 2 * (t - 0.3), tol=1e-14)
    >>> abs(t - 0.3) < 1e-13
    True
    """
    grid = np.linspace(lo, hi, int(points))
    vals = [fn(float(t)) for t in grid]
    i = int(np.argmin(vals))
    a, c = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    if derivative is not None:
        while c - a > tol:
            m = (a + c) / 2
            if m in (a, c):  # no float64 between a and c
                break
            if derivative(m) > 0:
                c = m
            else:
                a = m
        return (a + c) / 2
    r = (math.sqrt(5) - 1) / 2
    x1, x2 = c - r * (c - a), a + r * (c - a)
    f1, f2 = fn(x1), fn(x2)
    while c - a > tol:
        if f1 <= f2:
            c, x2, f2 = x2, x1, f1
            x1 = c - r * (c - a)
            f1 = fn(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + r * (c - a)
            f2 = fn(x2)
    return float((a + c) / 2)
