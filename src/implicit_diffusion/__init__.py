"""implicit-diffusion: optimization through stochastic sampling in PyTorch.

Tune the parameters θ of a sampler so that the law of its output, π*(θ), minimizes an
objective F(π*(θ)), with sampling and optimization run jointly in a single loop
(P. Marion et al., *Implicit Diffusion: Efficient Optimization through Stochastic
Sampling*, arXiv 2402.05468, AISTATS 2025).
"""

from .algorithms import DiffusionNestedLoop, DiffusionQueue, NestedLoop, SingleLoop, make_lr_scheduler
from .models import (
    EnergyMLP,
    FunctionPotential,
    GaussianMixture,
    GaussianPotential,
    Potential,
    ScoreMLP,
    as_potential,
    hexagon_mixture,
)
from .objectives import (
    ContrastiveKL,
    Estimator,
    GirsanovKL,
    KLToReference,
    RewardEstimator,
    Surrogate,
    adjoint_through_sampler,
    autograd_through_sampler,
    hexagon_reward,
    hexagon_reward_smooth,
)
from .samplers import DIFFUSION_STEPS, VPSchedule, ula_step

__version__ = "0.1.0"

__all__ = [
    "DIFFUSION_STEPS",
    "ContrastiveKL",
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
    "adjoint_through_sampler",
    "as_potential",
    "autograd_through_sampler",
    "hexagon_mixture",
    "hexagon_reward",
    "hexagon_reward_smooth",
    "make_lr_scheduler",
    "ula_step",
]
