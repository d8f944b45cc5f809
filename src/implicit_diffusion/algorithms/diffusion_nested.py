"""Nested-loop baseline for finite-horizon diffusions (sample, backpropagate, update).

For each θ update k: draw x₀ ~ p₀ and the noises, run all M sampler steps with θ_k, and
take the gradient of L(θ) = −λ·mean R(x_M) + Σ_m c_m(x_m, θ) through the whole trajectory —
by the adjoint sweep or by plain autograd through the unrolled sampler (the DRaFT-style
baseline; Clark et al. 2024) — then θ_{k+1} = optimizer step. Cost O(M) steps per update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from ..objectives.adjoint import adjoint_through_sampler, autograd_through_sampler
from .base import Callback

__all__ = ["DiffusionNestedLoop"]


class DiffusionNestedLoop:
    """Arguments as :class:`~implicit_diffusion.algorithms.DiffusionQueue`, plus
    ``gradient``: ``"adjoint"`` (memory O(M) states, one step's graph at a time) or
    ``"autograd"`` (the whole M-step graph alive at once)."""

    def __init__(
        self,
        model: torch.nn.Module,
        step,
        schedule,
        optimizer: torch.optim.Optimizer,
        *,
        init_fn: Callable[[torch.Generator], Tensor],
        reward_fn: Callable[[Tensor], Tensor],
        reward_weight: float = 1.0,
        running_cost: Callable[[Tensor, int], Tensor] | None = None,
        gradient: Literal["adjoint", "autograd"] = "adjoint",
        prediction: str = "score",
        max_grad_norm: float | None = None,
    ):
        if gradient not in ("adjoint", "autograd"):
            raise ValueError(f"gradient must be 'adjoint' or 'autograd', got {gradient!r}")
        self.model = model
        self.step_fn = step
        self.schedule = schedule
        self.optimizer = optimizer
        self.init_fn = init_fn
        self.reward_fn = reward_fn
        self.reward_weight = float(reward_weight)
        self.running_cost = running_cost
        self.through = adjoint_through_sampler if gradient == "adjoint" else autograd_through_sampler
        self.prediction = prediction
        self.max_grad_norm = max_grad_norm
        self.num_sampling_steps = len(schedule.times) - 1
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, k: int, *, generator: torch.Generator) -> dict:
        for p in self.params:
            p.grad = None
        x0 = self.init_fn(generator)
        noises = torch.randn((self.num_sampling_steps, *x0.shape), generator=generator, dtype=x0.dtype,
                             device=x0.device)
        info = self.through(self.step_fn, self.model, x0, noises, self.reward_fn, schedule=self.schedule,
                            weight=self.reward_weight, running_cost=self.running_cost, params=self.params,
                            prediction=self.prediction)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return {"reward": info.reward, "running_cost": info.running_cost}

    def run(self, num_steps: int, *, generator: torch.Generator, start: int = 0,
            callbacks: Iterable[Callback] = ()) -> None:
        callbacks = tuple(callbacks)
        for k in range(start, start + num_steps):
            stats = self.step(k, generator=generator)
            for cb in callbacks:
                cb(k, None, stats)
