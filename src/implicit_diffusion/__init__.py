"""implicit-diffusion: optimization through stochastic sampling in PyTorch.

Tune the parameters θ of a sampler so that the law of its output, π*(θ), minimizes an
objective F(π*(θ)), with sampling and optimization run jointly in a single loop
(P. Marion et al., *Implicit Diffusion: Efficient Optimization through Stochastic
Sampling*, arXiv 2402.05468, AISTATS 2025).
"""

from .algorithms import NestedLoop, SingleLoop, make_lr_scheduler
from .models import (
    EnergyMLP,
    FunctionPotential,
    GaussianMixture,
    GaussianPotential,
    Potential,
    as_potential,
    hexagon_mixture,
)
from .objectives import (
    ContrastiveKL,
    Estimator,
    KLToReference,
    RewardEstimator,
    Surrogate,
    hexagon_reward,
    hexagon_reward_smooth,
)
from .samplers import ula_step

__version__ = "0.1.0"

__all__ = [
    "ContrastiveKL",
    "EnergyMLP",
    "Estimator",
    "FunctionPotential",
    "GaussianMixture",
    "GaussianPotential",
    "KLToReference",
    "NestedLoop",
    "Potential",
    "RewardEstimator",
    "SingleLoop",
    "Surrogate",
    "as_potential",
    "hexagon_mixture",
    "hexagon_reward",
    "hexagon_reward_smooth",
    "make_lr_scheduler",
    "ula_step",
]
