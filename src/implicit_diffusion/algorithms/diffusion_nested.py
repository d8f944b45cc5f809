"""Nested-loop baseline for finite-horizon diffusions (sample, backpropagate, update).

For each θ update k: draw x₀ ~ p₀ and the noises, run all M sampler steps with θ_k, and
take the gradient of L(θ) = −λ·mean R(x_M) + Σ_m c_m(x_m, θ) through the whole trajectory —
by the adjoint sweep or by plain autograd through the unrolled sampler (the DRaFT-style
baseline; Clark et al. 2024) — then θ_{k+1} = optimizer step. Cost O(M) steps per update.

With ``last_k`` = K < M (autograd only) it is **DRaFT-K** (Clark, Vendrow, Swersky & Fleet, ICLR 2024):
the first M − K steps run without a graph and the reward is backpropagated through the last K
(:func:`~implicit_diffusion.objectives.adjoint.autograd_through_sampler`); the path-KL running cost
still counts every step. Cost: M forward steps, the graph of K.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .. import distributed
from ..models.diffusion_model import DiffusionModel
from ..objectives.adjoint import adjoint_through_sampler, autograd_through_sampler, check_last_k
from ..samplers.diffusion import DiffusionStep
from ..samplers.schedules import Prediction, VPSchedule
from .base import clear_grads
from .diffusion_base import DiffusionAlgorithm

__all__ = ["DiffusionNestedLoop"]


class DiffusionNestedLoop(DiffusionAlgorithm):
    """Arguments as :class:`~.diffusion_base.DiffusionAlgorithm`, plus ``gradient``:
    ``"adjoint"`` (memory O(M) states, one step's graph at a time) or ``"autograd"`` (the whole
    M-step graph alive at once), and ``last_k``: with ``"autograd"``, backpropagate through the last K
    steps only (DRaFT-K; 1 ≤ K ≤ M; None = M, the full backprop).

    Nothing is carried from one update to the next: its checkpoint (:meth:`state`) is θ and the
    optimizer's state."""

    def __init__(
        self,
        model: torch.nn.Module | DiffusionModel,
        step: DiffusionStep,
        schedule: VPSchedule | torch.optim.Optimizer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        init_fn: Callable[[torch.Generator], Tensor],
        reward_fn: Callable[[Tensor], Tensor],
        reward_weight: float = 1.0,
        running_cost: Callable[[Tensor, int], Tensor] | None = None,
        prediction: Prediction | None = None,
        max_grad_norm: float | None = None,
        gradient: Literal["adjoint", "autograd"] = "adjoint",
        last_k: int | None = None,
    ):
        if gradient not in ("adjoint", "autograd"):
            raise ValueError(f"gradient must be 'adjoint' or 'autograd', got {gradient!r}")
        if last_k is not None and gradient != "autograd":
            raise ValueError(f"last_k (DRaFT-K) truncates the backprop: it needs gradient='autograd', got "
                             f"{gradient!r}")
        super().__init__(model, step, schedule, optimizer, init_fn=init_fn, reward_fn=reward_fn,
                         reward_weight=reward_weight, running_cost=running_cost, prediction=prediction,
                         max_grad_norm=max_grad_norm)
        self.last_k = check_last_k(last_k, self.num_sampling_steps) if last_k is not None else None
        self.through = (adjoint_through_sampler if gradient == "adjoint"
                        else functools.partial(autograd_through_sampler, last_k=self.last_k))

    def step(self, k: int, *, generator: torch.Generator) -> dict:
        clear_grads(self.params)
        x0 = self.init_fn(generator)
        noises = torch.randn((self.num_sampling_steps, *x0.shape), generator=generator, dtype=x0.dtype,
                             device=x0.device)
        info = self.through(self.step_fn, self.model, x0, noises, self.reward_fn, schedule=self.schedule,
                            weight=self.reward_weight, running_cost=self.running_cost, params=self.params,
                            prediction=self.prediction)
        self._update()
        # sharded batches (torchrun): the mean reward over all processes' equal shares
        return {"reward": distributed.global_mean(info.reward.reshape(1)), "running_cost": info.running_cost}
