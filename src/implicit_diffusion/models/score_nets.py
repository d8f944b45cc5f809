"""Time-conditioned networks for denoising diffusions.

A score model is an ``nn.Module`` called as ``model(x, t)`` with ``x`` of shape
``(batch, *event)`` and ``t`` a float tensor of shape ``(batch,)`` (continuous time of the
noise schedule, so per-sample times — as the queue algorithm needs — are the normal case).
Its output has x's shape and is a prediction of the kind named by its ``prediction``
attribute (``"epsilon"``, ``"score"`` or ``"x0"``); conversions live in
:mod:`implicit_diffusion.samplers.schedules`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalTimeEmbedding", "ScoreMLP"]


class SinusoidalTimeEmbedding(nn.Module):
    """t ↦ [sin(ω_j t), cos(ω_j t)]_j with ω_j log-spaced in [1, max_frequency] (Vaswani et al. 2017;
    Ho et al. 2020). ``t``: ``(batch,)`` → ``(batch, dim)``."""

    def __init__(self, dim: int = 64, max_frequency: float = 1000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even integer >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class ScoreMLP(nn.Module):
    """MLP for low-dimensional data: [x, emb(t)] → hidden layers (SiLU) → prediction of x's shape.

    Args:
        dim: data dimension d; ``x`` has shape ``(batch, d)``.
        hidden: width; depth: number of hidden layers.
        prediction: what the output means (``"epsilon"`` by default, the usual DSM target).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32,
                 prediction: str = "epsilon"):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        if prediction not in ("epsilon", "score", "x0"):
            raise ValueError(f"prediction must be one of 'epsilon', 'score', 'x0', got {prediction!r}")
        self.prediction = prediction
        # The constructor's arguments (JSON types): ``ScoreMLP(**m.config)`` rebuilds the architecture.
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "time_dim": time_dim, "prediction": prediction}
        self.embed = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, self.embed(t).to(x.dtype)], dim=1))
