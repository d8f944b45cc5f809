"""Reward functions of the paper's Langevin experiment (Marion et al. 2024, §5.1).

Both are products f₁(x₁)·f₂(x₂), which lets the experiment compute exact expectations
under a Gaussian mixture.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hexagon_reward", "hexagon_reward_smooth", "REWARD_CENTRE"]

REWARD_CENTRE = (4.0, 3.8)
_SCALE = 20.0  # exp(−‖x − a‖²/20)


def hexagon_reward(x: Tensor) -> Tensor:
    """R(x) = 1[x₁ ≥ 0] · exp(−((x₁ − 4)² + (x₂ − 3.8)²)/20) / 2.5 (non-differentiable).

    ``x``: ``(num_particles, 2)`` → ``(num_particles,)``.
    """
    x1, x2 = x[:, 0], x[:, 1]
    q = (x1 - REWARD_CENTRE[0]).square_().add_((x2 - REWARD_CENTRE[1]).square_())
    return torch.exp(q.mul_(-1.0 / _SCALE)).mul_(x1 >= 0).mul_(1 / 2.5)


def hexagon_reward_smooth(x: Tensor) -> Tensor:
    """R_s(x) = sigmoid(x₁/0.5) · exp(−((x₁ − 4)² + (x₂ − 3.8)²)/20) / 0.7 (differentiable)."""
    x1, x2 = x[:, 0], x[:, 1]
    q = (x1 - REWARD_CENTRE[0]) ** 2 + (x2 - REWARD_CENTRE[1]) ** 2
    return torch.sigmoid(x1 / 0.5) * torch.exp(-q / _SCALE) / 0.7
