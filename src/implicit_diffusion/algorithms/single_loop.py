"""Single-loop Implicit Diffusion for infinite-horizon (Langevin) samplers.

Marion et al. 2024, Algorithm 2: particles are never restarted; at each iteration k,

    Γ_k      = Γ(p_k, θ_k)                       (estimator on the current particles)
    p_{k+1}  = Σ^S(p_k, θ_k)                     (S sampler steps with the current θ)
    θ_{k+1}  = θ_k − η_k Γ_k                     (or any torch.optim update)

Cost O(K) sampler steps for K parameter updates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..samplers.guard import reject_nonfinite
from ..samplers.langevin import ula_step
from .base import NONFINITE, Callback, StepSize, apply_surrogate, resolve_step_size, run_steps, with_acceptance

__all__ = ["SingleLoop"]


class SingleLoop:
    """Algorithm 2 of Marion et al. 2024 with S = ``sampler_steps_per_update`` steps per θ update.

    Args:
        potential: a :class:`~implicit_diffusion.models.Potential` (θ = its parameters).
        estimator: an :class:`~implicit_diffusion.objectives.Estimator` giving Γ.
        optimizer: any ``torch.optim`` optimizer over the potential's parameters.
        step_size: sampler step size γ (a float, or a function of k).
        sampler: a step with the shared Langevin signature (default ULA).
        lr_scheduler: optional ``torch.optim.lr_scheduler``, stepped after every θ update.
        nonfinite: ``"update"`` (default: apply every step as computed) or ``"skip"``: a particle
            whose move is non-finite stays put (:func:`~implicit_diffusion.samplers.guard.reject_nonfinite`,
            count in ``algo.sampler.rejected``) and a θ update with a non-finite Γ is skipped.

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> from implicit_diffusion.objectives import RewardEstimator
        >>> V = GaussianPotential(torch.zeros(1))
        >>> est = RewardEstimator(lambda x: -(x[:, 0] - 2.0) ** 2)   # optimum θ = 2
        >>> algo = SingleLoop(V, est, torch.optim.SGD(V.parameters(), lr=0.05), step_size=0.1)
        >>> g = torch.Generator().manual_seed(0)
        >>> x = algo.run(torch.randn(2000, 1, generator=g), 1500, generator=g)
        >>> abs(V.mean.item() - 2.0) < 0.2
        True
    """

    def __init__(
        self,
        potential,
        estimator,
        optimizer: torch.optim.Optimizer,
        *,
        step_size: StepSize,
        sampler=ula_step,
        sampler_steps_per_update: int = 1,
        lr_scheduler=None,
        nonfinite: str = "update",
    ):
        if sampler_steps_per_update < 1:
            raise ValueError(f"sampler_steps_per_update must be >= 1, got {sampler_steps_per_update}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self.potential = potential
        self.estimator = estimator
        self.optimizer = optimizer
        self.step_size = step_size
        # "skip": a particle's non-finite move is rejected (it stays put) and so is a θ update with
        # a non-finite Γ; stats["update_skipped"] says which updates were skipped
        self.nonfinite = nonfinite
        self.sampler = reject_nonfinite(sampler) if nonfinite == "skip" else sampler
        self.sampler_steps_per_update = sampler_steps_per_update
        self.lr_scheduler = lr_scheduler

    def step(self, x: Tensor, k: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """One iteration: returns (p_{k+1}, statistics of Γ(p_k, θ_k))."""
        gamma = resolve_step_size(self.step_size, k)
        # Sampling and Γ need no autograd graph: particles carried to the next iteration must
        # not hold history (the graph would grow with k).
        with torch.no_grad():
            surrogate = self.estimator(self.potential, x)
            for _ in range(self.sampler_steps_per_update):
                x, info = self.sampler(x, self.potential, step_size=gamma, generator=generator)
        applied = apply_surrogate(self.potential, surrogate, self.optimizer, self.lr_scheduler, self.nonfinite)
        stats = with_acceptance(surrogate.stats, info)
        if self.nonfinite == "skip":
            stats = {**stats, "update_skipped": torch.tensor(0.0 if applied else 1.0)}
        return x, stats

    def run(
        self,
        x: Tensor,
        num_steps: int,
        *,
        generator: torch.Generator | None = None,
        start: int = 0,
        callbacks: Iterable[Callback] = (),
    ) -> Tensor:
        """Run ``num_steps`` iterations from particles ``x`` ``(num_particles, dim)``; return the last."""
        return run_steps(
            lambda x, k: self.step(x, k, generator=generator), x, num_steps, start=start, callbacks=callbacks
        )
