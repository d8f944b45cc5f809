"""Bilevel optimization with an inner *argmin*: the joint single loop and the nested baseline.

min_θ ℓ(θ) = f(x*(θ)), x*(θ) = argmin_x g(x, θ). Both algorithms use the implicit-differentiation
estimator Γ(x, θ) = ∇θ[−⟨∇ₓg(x, θ), v⟩] with ∇²ₓₓg(x, θ) v ≈ ∇f(x) from conjugate gradient
(:mod:`implicit_diffusion.objectives.implicit`).

Joint single loop (the seed slides' algorithm; SOBA-like, Dagréou et al. 2022), per iteration k:

    v_k      = CG_k-steps(∇²ₓₓg(x_k, θ_k), ∇f(x_k); warm start v_{k−1})
    Γ_k      = −∂²_{θx}g(x_k, θ_k)ᵀ v_k
    x_{k+1}  = x_k − η ∇ₓg(x_k, θ_k)            (S such steps)
    θ_{k+1}  = θ_k − ε Γ_k                      (or any torch.optim update)

Nested baseline (Ghadimi & Wang 2018; Ji et al. 2021): for every θ update, run gradient steps on x
until ‖∇ₓg‖ ≤ tol (at most T, counted), CG to a tolerance, then the same θ step.

Both count ``inner_steps`` (gradient steps on x) and ``hvps`` (Hessian-vector products) so
the two can be compared at equal inner work.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..objectives.implicit import InnerLoss, Linearization, OuterLoss, conjugate_gradient, inner_gradient, linearize
from .base import Callback, clear_grads, run_steps

__all__ = ["JointBilevel", "NestedBilevel"]


class _Bilevel:
    """Shared state: θ, its optimizer, the CG solution v (warm start) and the work counters."""

    def __init__(self, inner_loss: InnerLoss, outer_loss: OuterLoss, theta: Tensor, optimizer, step_size: float,
                 lr_scheduler=None):
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not theta.requires_grad:
            raise ValueError("theta must require grad (an nn.Parameter) so the optimizer can update it")
        self.inner_loss = inner_loss
        self.outer_loss = outer_loss
        self.theta = theta
        self.optimizer = optimizer
        self.step_size = step_size
        self.lr_scheduler = lr_scheduler
        self.v: Tensor | None = None  # CG solution, kept between θ updates as a warm start
        self.inner_steps = 0  # gradient steps on x so far
        self.hvps = 0  # Hessian-vector products so far
        self.updates = 0  # θ updates so far

    def _gradient_steps(self, x: Tensor, max_steps: int, tol: float = 0.0) -> tuple[Tensor, float]:
        """Up to ``max_steps`` steps x ← x − η∇ₓg(x, θ), stopping once ‖∇ₓg‖ ≤ tol; returns x and the
        norm of the last gradient computed (before the last step if one was taken)."""
        norm = float("inf")
        for _ in range(max_steps):
            grad = inner_gradient(self.inner_loss, x, self.theta)
            norm = float(grad.norm())
            if norm <= tol:
                break
            x = x - self.step_size * grad
            self.inner_steps += 1
        return x, norm

    def _outer(self, x: Tensor) -> tuple[float, Tensor]:
        """f(x) and ∇f(x) from one forward and backward pass."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            value = self.outer_loss(xr)
            (grad,) = torch.autograd.grad(value, xr)
        return float(value.detach()), grad

    def _refine_v(self, lin: Linearization, rhs: Tensor, max_iter: int, tol: float, warm: bool) -> Tensor:
        """v ≈ (∇²ₓₓg(x, θ))⁻¹ ∇f(x) by CG on the linearization at x, from the previous v when ``warm``."""
        res = conjugate_gradient(lin.hvp, rhs, self.v if warm else None, max_iter=max_iter, tol=tol)
        self.hvps += res.matvecs
        self.v = res.solution
        return res.solution

    def _theta_step(self, lin: Linearization, v: Tensor) -> Tensor:
        """θ ← optimizer step with gradient Γ(x, θ) (the θ-gradient of the implicit surrogate)."""
        clear_grads(p for group in self.optimizer.param_groups for p in group["params"])
        lin.surrogate(v).backward(inputs=[self.theta])
        gamma = self.theta.grad.detach().clone()
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.updates += 1
        return gamma

    def step(self, x: Tensor, k: int) -> tuple[Tensor, dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, x: Tensor, num_steps: int, *, start: int = 0, callbacks: Iterable[Callback] = ()) -> Tensor:
        """Run ``num_steps`` θ updates from the inner iterate ``x``; return the last x.

        Callbacks get ``(k, x, stats)`` with ``stats`` holding ``outer_loss`` f(x) at the x the
        update used, ``gamma_norm`` ‖Γ‖, ``inner_grad_norm``, ``inner_steps`` and ``hvps`` (totals so far).
        """
        return run_steps(self.step, x.detach(), num_steps, start=start, callbacks=callbacks)

    def _stats(self, outer: float, gamma: Tensor, inner_norm: float) -> dict:
        return {"outer_loss": outer, "gamma_norm": float(gamma.norm()), "inner_grad_norm": inner_norm,
                "inner_steps": self.inner_steps, "hvps": self.hvps}


class JointBilevel(_Bilevel):
    """The joint single loop: S inner gradient steps, k CG steps and one θ update per iteration.

    Args:
        inner_loss: g(x, θ) -> 0-d tensor, strongly convex in x.
        outer_loss: f(x) -> 0-d tensor.
        theta: the outer parameter (an ``nn.Parameter``) that ``optimizer`` updates.
        optimizer: any ``torch.optim`` optimizer over θ (its learning rate is ε·η of the slides).
        step_size: η of the inner gradient steps.
        inner_steps_per_update: S.
        cg_steps: CG steps per iteration, warm-started from the previous v.
        lr_scheduler: optional, stepped after every θ update.

    Example (ridge in one dimension, g = (x − 1)²/2 + e^θ x²/2, f = (x − 0.5)²/2: θ* = 0):

        >>> th = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        >>> g = lambda x, t: 0.5 * ((x - 1) ** 2).sum() + 0.5 * t.exp() * (x ** 2).sum()
        >>> f = lambda x: 0.5 * ((x - 0.5) ** 2).sum()
        >>> algo = JointBilevel(g, f, th, torch.optim.SGD([th], lr=1.0), step_size=0.3)
        >>> x = algo.run(torch.zeros(1, dtype=torch.float64), 300)
        >>> abs(th.item()) < 1e-6, algo.inner_steps
        (True, 300)
    """

    def __init__(self, inner_loss: InnerLoss, outer_loss: OuterLoss, theta: Tensor, optimizer, *, step_size: float,
                 inner_steps_per_update: int = 1, cg_steps: int = 1, lr_scheduler=None):
        super().__init__(inner_loss, outer_loss, theta, optimizer, step_size, lr_scheduler)
        if inner_steps_per_update < 1:
            raise ValueError(f"inner_steps_per_update must be >= 1, got {inner_steps_per_update}")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        self.inner_steps_per_update = inner_steps_per_update
        self.cg_steps = cg_steps

    def step(self, x: Tensor, k: int) -> tuple[Tensor, dict]:
        """One iteration: Γ on (x_k, θ_k), S gradient steps with θ_k, then the θ update."""
        lin = linearize(self.inner_loss, x, self.theta)  # one graph for ∇ₓg, the HVPs and Γ at (x_k, θ_k)
        outer, rhs = self._outer(x)
        v = self._refine_v(lin, rhs, self.cg_steps, 0.0, warm=True)
        # the first inner step reuses ∇ₓg(x_k, θ_k) from the linearization
        x_next = x - self.step_size * lin.grad
        self.inner_steps += 1
        x_next, _ = self._gradient_steps(x_next, self.inner_steps_per_update - 1)
        gamma = self._theta_step(lin, v)
        return x_next, self._stats(outer, gamma, float(lin.grad.norm()))


class NestedBilevel(_Bilevel):
    """The nested baseline: solve the inner problem (to ``inner_tol`` or ``max_inner_steps``), solve
    the linear system by CG (to ``cg_tol`` or ``max_cg_steps``), then one θ update.

    ``warm_start=False`` restarts x from the first x given to :meth:`run` (and v from 0) at
    every update; ``True`` continues from the previous solutions.
    """

    def __init__(self, inner_loss: InnerLoss, outer_loss: OuterLoss, theta: Tensor, optimizer, *, step_size: float,
                 inner_tol: float, max_inner_steps: int, cg_tol: float, max_cg_steps: int, warm_start: bool = True,
                 lr_scheduler=None):
        super().__init__(inner_loss, outer_loss, theta, optimizer, step_size, lr_scheduler)
        if max_inner_steps < 1:
            raise ValueError(f"max_inner_steps must be >= 1, got {max_inner_steps}")
        if max_cg_steps < 1:
            raise ValueError(f"max_cg_steps must be >= 1, got {max_cg_steps}")
        if not (inner_tol >= 0 and cg_tol >= 0):
            raise ValueError(f"inner_tol and cg_tol must be >= 0, got {inner_tol} and {cg_tol}")
        self.inner_tol = inner_tol
        self.max_inner_steps = max_inner_steps
        self.cg_tol = cg_tol
        self.max_cg_steps = max_cg_steps
        self.warm_start = warm_start
        self._x0: Tensor | None = None

    def run(self, x: Tensor, num_steps: int, *, start: int = 0, callbacks: Iterable[Callback] = ()) -> Tensor:
        if self._x0 is None:
            self._x0 = x.detach().clone()
        return super().run(x, num_steps, start=start, callbacks=callbacks)

    def step(self, x: Tensor, k: int) -> tuple[Tensor, dict]:
        """One θ update after solving the inner problem and the linear system."""
        if not self.warm_start and self._x0 is not None:
            x = self._x0
        x, norm = self._gradient_steps(x, self.max_inner_steps, self.inner_tol)
        lin = linearize(self.inner_loss, x, self.theta)
        outer, rhs = self._outer(x)
        v = self._refine_v(lin, rhs, self.max_cg_steps, self.cg_tol, warm=self.warm_start)
        gamma = self._theta_step(lin, v)
        return x, self._stats(outer, gamma, norm)
