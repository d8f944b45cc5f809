"""implicit-diffusion: optimization through stochastic sampling in PyTorch.

Tune the parameters θ of a sampler so that the law of its output, π*(θ), minimizes an
objective F(π*(θ)), with sampling and optimization run jointly in a single loop
(P. Marion et al., *Implicit Diffusion: Efficient Optimization through Stochastic
Sampling*, arXiv 2402.05468, AISTATS 2025).
"""

from .algorithms import DiffusionNestedLoop, DiffusionQueue, NestedLoop, SingleLoop, make_lr_scheduler
from .algorithms.base import Callback
from .models import (
    DiffusionModel,
    EnergyMLP,
    FunctionPotential,
    GaussianMixture,
    GaussianPotential,
    Potential,
    ScoreMLP,
    add_lora,
    as_potential,
    hexagon_mixture,
    load_classifier,
    merge_lora,
)
from .models.diffusers_adapter import load_diffusers
from .objectives import (
    IMAGE_REWARDS,
    ClassReward,
    ContrastiveKL,
    Estimator,
    GirsanovKL,
    KLToReference,
    RewardEstimator,
    Surrogate,
    adjoint_through_sampler,
    autograd_through_sampler,
    brightness,
    hexagon_reward,
    hexagon_reward_smooth,
    redness,
)
from .pretrained.loading import load_diffusion_model
from .samplers import DIFFUSION_STEPS, VPSchedule, ula_step
from .samplers.diffusion import ddpm_step, euler_maruyama_step, sample

__version__ = "0.1.0"

__all__ = [
    "DIFFUSION_STEPS",
    "IMAGE_REWARDS",
    "Callback",
    "ClassReward",
    "ContrastiveKL",
    "DiffusionModel",
    "DiffusionNestedLoop",
    "DiffusionQueue",
    "EnergyMLP",
    "Estimator",
    "FunctionPotential",
    "GirsanovKL",
    "GaussianMixture",
    "GaussianPotential",
    "KLToReference",
    "NestedLoop",
    "Potential",
    "RewardEstimator",
    "ScoreMLP",
    "SingleLoop",
    "Surrogate",
    "VPSchedule",
    "add_lora",
    "adjoint_through_sampler",
    "as_potential",
    "autograd_through_sampler",
    "brightness",
    "ddpm_step",
    "euler_maruyama_step",
    "hexagon_mixture",
    "hexagon_reward",
    "hexagon_reward_smooth",
    "load_classifier",
    "load_diffusers",
    "load_diffusion_model",
    "make_lr_scheduler",
    "merge_lora",
    "redness",
    "sample",
    "ula_step",
]
