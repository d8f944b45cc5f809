"""Reward objective F(p) = −λ E_p[R] for Gibbs targets (Marion et al. 2024, §3).

∇θ(−E_{π*(θ)}[R]) = Cov_{π*(θ)}(R(X), ∇θV(X, θ)), estimated on the current particles by

    Γ_R(p, θ) = λ · 1/(N−1) Σᵢ (R(xᵢ) − R̄) ∇θV(xᵢ, θ),   R̄ = (1/N) Σᵢ R(xᵢ),

the gradient of the surrogate Σᵢ wᵢ V(xᵢ, θ) with wᵢ = λ(R(xᵢ) − R̄)/(N−1): the unbiased
sample covariance, so E[Γ_R] = ∇θ(−λE[R]) exactly for i.i.d. particles. Only reward
*values* enter, so R may be non-differentiable (an indicator). With particles sharded over
processes (:mod:`implicit_diffusion.distributed`), N and R̄ are global.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_values
from ..distributed import global_count, global_mean
from .base import Estimator, Surrogate

__all__ = ["RewardEstimator"]


class RewardEstimator(Estimator):
    """Γ_R for F(p) = −λ E_p[R]; reports the particles' mean reward as ``stats["reward"]``.

    Args:
        reward_fn: ``R(x) -> (num_particles,)``; called without gradient.
        weight: λ > 0 maximizes the reward.
    """

    def __init__(self, reward_fn: Callable[[Tensor], Tensor], weight: float = 1.0):
        self.reward_fn = reward_fn
        self.weight = float(weight)
        self._name = f"reward_fn {callable_name(reward_fn)}"
        self._first = True

    def __call__(self, potential, x: Tensor) -> Surrogate:
        with torch.no_grad():
            # finiteness (a host sync) is checked on the first call; later NaNs show in θ
            r = check_values(self._name, call_user(self._name, self.reward_fn, x), x, finite=self._first)
            self._first = False
            if not r.is_floating_point():  # an indicator returned as bool or int
                r = r.to(x.dtype)
            n = global_count(x.shape[0], x.device)  # over all processes when particles are sharded
            r_mean = global_mean(r, n)
            w = (r - r_mean).mul_(self.weight / max(n - 1, 1))
        return Surrogate((x,), (w,), {"reward": r_mean})
