"""Objectives: estimators Γ(p, θ) as surrogate losses, and reward functions."""

from .base import Estimator, SumEstimator, Surrogate
from .kl import ContrastiveKL, KLToReference
from .reward import RewardEstimator
from .rewards import hexagon_reward, hexagon_reward_smooth

__all__ = [
    "ContrastiveKL",
    "Estimator",
    "KLToReference",
    "RewardEstimator",
    "SumEstimator",
    "Surrogate",
    "hexagon_reward",
    "hexagon_reward_smooth",
]
