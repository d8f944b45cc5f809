"""Objectives: estimators Γ(p, θ) as surrogate losses, gradients through finite-horizon
samplers (adjoint, autograd), path KL (Girsanov), and reward functions."""

from .adjoint import (
    SamplerGradInfo,
    TerminalGrad,
    Trajectory,
    adjoint_backward,
    adjoint_step,
    adjoint_surrogate,
    adjoint_through_sampler,
    autograd_through_sampler,
    sample_with_trajectory,
    terminal_reward_gradient,
)
from .base import Estimator, SumEstimator, Surrogate
from .class_reward import ClassReward, fraction_classified_as, parse_class_reward
from .girsanov import DiscreteMeanKL, GirsanovKL
from .image_rewards import IMAGE_REWARDS, brightness, redness
from .implicit import (
    CGResult,
    Linearization,
    conjugate_gradient,
    hessian_vector_product,
    implicit_surrogate,
    inner_gradient,
    linearize,
    outer_gradient,
)
from .kl import ContrastiveKL, KLToReference, MinibatchContrastiveKL
from .reward import RewardEstimator
from .rewards import hexagon_reward, hexagon_reward_smooth

__all__ = [
    "ClassReward",
    "fraction_classified_as",
    "parse_class_reward",
    "CGResult",
    "IMAGE_REWARDS",
    "Linearization",
    "conjugate_gradient",
    "hessian_vector_product",
    "implicit_surrogate",
    "inner_gradient",
    "linearize",
    "outer_gradient",
    "ContrastiveKL",
    "DiscreteMeanKL",
    "Estimator",
    "GirsanovKL",
    "KLToReference",
    "MinibatchContrastiveKL",
    "RewardEstimator",
    "SamplerGradInfo",
    "SumEstimator",
    "Surrogate",
    "TerminalGrad",
    "Trajectory",
    "adjoint_backward",
    "brightness",
    "adjoint_step",
    "adjoint_surrogate",
    "adjoint_through_sampler",
    "autograd_through_sampler",
    "hexagon_reward",
    "hexagon_reward_smooth",
    "redness",
    "sample_with_trajectory",
    "terminal_reward_gradient",
]
