"""Nested-loop baseline (Marion et al. 2024, Algorithm 1).

For each θ update k: restart the particles from p₀ (or keep them, ``warm_start=True``),
run T sampler steps with θ_k, then θ_{k+1} = θ_k − η Γ(p_T, θ_k). Cost O(K·T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..samplers.guard import reject_nonfinite
from ..samplers.langevin import ula_step
from .base import NONFINITE, Callback, StepSize, apply_surrogate, resolve_step_size, run_steps, with_acceptance

__all__ = ["NestedLoop"]


class NestedLoop:
    """Algorithm 1: T = ``num_inner_steps`` sampler steps per θ update.

    Args:
        init_fn: ``init_fn(generator) -> (num_particles, dim)`` draws p₀ (used at every update
            unless ``warm_start``, and for the first one always).
        warm_start: keep the particles between updates instead of restarting them.
        nonfinite: ``"update"`` or ``"skip"``, as in :class:`~implicit_diffusion.algorithms.SingleLoop`.
        Other arguments as in :class:`~implicit_diffusion.algorithms.SingleLoop`.
    """

    def __init__(
        self,
        potential,
        estimator,
        optimizer: torch.optim.Optimizer,
        *,
        init_fn: Callable[[torch.Generator | None], Tensor],
        num_inner_steps: int,
        step_size: StepSize,
        sampler=ula_step,
        warm_start: bool = False,
        lr_scheduler=None,
        nonfinite: str = "update",
    ):
        if num_inner_steps < 1:
            raise ValueError(f"num_inner_steps must be >= 1, got {num_inner_steps}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self.potential = potential
        self.estimator = estimator
        self.optimizer = optimizer
        self.init_fn = init_fn
        self.num_inner_steps = num_inner_steps
        self.step_size = step_size
        self.nonfinite = nonfinite  # as in SingleLoop
        self.sampler = reject_nonfinite(sampler) if nonfinite == "skip" else sampler
        self.warm_start = warm_start
        self.lr_scheduler = lr_scheduler

    def step(self, x: Tensor | None, k: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """One θ update: returns (p_T(θ_k), statistics of Γ(p_T, θ_k))."""
        gamma = resolve_step_size(self.step_size, k)
        with torch.no_grad():  # no graph through the inner loop: Γ needs only the samples
            if x is None or not self.warm_start:
                x = self.init_fn(generator)
            info = None
            for _ in range(self.num_inner_steps):
                x, info = self.sampler(x, self.potential, step_size=gamma, generator=generator)
            surrogate = self.estimator(self.potential, x)
        applied = apply_surrogate(self.potential, surrogate, self.optimizer, self.lr_scheduler, self.nonfinite)
        stats = with_acceptance(surrogate.stats, info)
        if self.nonfinite == "skip":
            stats = {**stats, "update_skipped": torch.tensor(0.0 if applied else 1.0)}
        return x, stats

    def run(
        self,
        x: Tensor | None,
        num_steps: int,
        *,
        generator: torch.Generator | None = None,
        start: int = 0,
        callbacks: Iterable[Callback] = (),
    ) -> Tensor:
        """Run ``num_steps`` θ updates (``x`` may be None: the first update draws p₀)."""
        return run_steps(
            lambda x, k: self.step(x, k, generator=generator), x, num_steps, start=start, callbacks=callbacks
        )
