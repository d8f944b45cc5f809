"""Adjoint Matching as a finetuning algorithm (Domingo-Enrich et al., ICLR 2025; objectives.adjoint_matching).

For each θ update k: draw x₀ ~ p₀ and the noises, sample the path with θ_k (no graph), solve the lean
adjoint backward with the frozen base model θ₀, and take a step on the regression loss

    L(θ) = Σ_m (1/B) Σ_i ‖u_m(x_m,i) + σ_m ã_{m+1,i}‖²,    u_m = (μ_θ − μ_θ₀)(x_m, m)/σ_m,

whose optimum samples p* ∝ p_θ₀·e^{(λ/β)R}. The KL to θ₀ is in that target, not in a running cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import distributed
from ..models.diffusion_model import DiffusionModel
from ..objectives.adjoint_matching import adjoint_matching_backward, frozen_copy, step_noise_scale
from ..samplers.diffusion import DiffusionStep
from ..samplers.schedules import Prediction, VPSchedule
from .base import clear_grads
from .diffusion_base import DiffusionAlgorithm

__all__ = ["DiffusionAdjointMatching"]


class DiffusionAdjointMatching(DiffusionAlgorithm):
    """Arguments as :class:`~.diffusion_base.DiffusionAlgorithm`, plus ``kl_weight`` β > 0: the target is the
    tilt of the model at construction (θ₀, snapshotted then) by e^{(λ/β)R}, λ = ``reward_weight``.

    ``step`` must be a memoryless stochastic step with additive noise (``ddpm_step``). ``running_cost`` is
    accepted so that every finetuning algorithm takes the same arguments, and is not used for the
    gradient: the KL penalty is the target's β. The reported ``running_cost`` is β·Σ_m ½‖u_m‖², β times the
    path KL of the drawn batch. Its checkpoint (:meth:`state`) holds θ, the optimizer's state and θ₀."""

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
        kl_weight: float = 1.0,
    ):
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight > 0:
            raise ValueError(f"kl_weight (β) must be a number > 0 for Adjoint Matching (its target is "
                             f"p₀·e^{{(λ/β)R}}), got {kl_weight!r}")
        super().__init__(model, step, schedule, optimizer, init_fn=init_fn, reward_fn=reward_fn,
                         reward_weight=reward_weight, running_cost=running_cost, prediction=prediction,
                         max_grad_norm=max_grad_norm)
        self.kl_weight = float(kl_weight)
        self.base = frozen_copy(self.model)
        self._noise_scales: list[float] | None = None

    def step(self, k: int, *, generator: torch.Generator) -> dict:
        clear_grads(self.params)
        x0 = self.init_fn(generator)
        noises = torch.randn((self.num_sampling_steps, *x0.shape), generator=generator, dtype=x0.dtype,
                             device=x0.device)
        if self._noise_scales is None:  # σ_m depends on the schedule only: read once
            self._noise_scales = [step_noise_scale(self.step_fn, self.base, x0, m, schedule=self.schedule,
                                                   prediction=self.prediction)
                                  for m in range(self.num_sampling_steps)]
        info = adjoint_matching_backward(self.step_fn, self.model, self.base, x0, noises, self.reward_fn,
                                         schedule=self.schedule, reward_weight=self.reward_weight,
                                         kl_weight=self.kl_weight, params=self.params,
                                         noise_scales=self._noise_scales, prediction=self.prediction)
        self._update()
        return {"reward": distributed.global_mean(info.reward.reshape(1)),
                "running_cost": self.kl_weight * info.control_cost, "loss": info.loss}

    def state(self, prefix: str = "algo") -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().state(prefix)
        tensors.update({f"{prefix}.base.{k}": v.detach().clone() for k, v in self.base.state_dict().items()})
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "algo") -> None:
        super().load_state(tensors, meta, prefix)
        head = f"{prefix}.base."
        self.base.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
