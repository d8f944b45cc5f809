"""Gaussian problems with exact ∇ℓ: π*(θ) = N(θ, σ²I) and rewards whose ℓ(θ) = −E_{π*(θ)}[R] is closed-form.

Potential V(x, θ) = ‖x − θ‖²/(2σ²) (:class:`~.potentials.GaussianPotential`), ∇θV(x, θ) = −(x − θ)/σ².
Rewards (t = ``target``, d = its length):

- ``quadratic``: R(x) = −Σᵢ aᵢ(xᵢ − tᵢ)²  ⇒  ℓ(θ) = Σᵢ aᵢ((θᵢ − tᵢ)² + σ²),  ∇ℓ(θ) = 2a ⊙ (θ − t);
- ``bump``: R(x) = exp(−‖x − t‖²/(2w²)) (bounded)  ⇒
  ℓ(θ) = −(w²/(w² + σ²))^{d/2} exp(−‖θ − t‖²/(2(w² + σ²))),  ∇ℓ(θ) = −ℓ(θ) (θ − t)/(w² + σ²).

Both have θ* = t. The ``rates`` experiment measures the single loop's convergence on them
(Marion et al. 2024, the discrete and continuous-time analyses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["GaussianRewardProblem"]


@dataclass(frozen=True)
class GaussianRewardProblem:
    """π*(θ) = N(θ, σ²I), a reward R with closed-form ℓ(θ) = −E_{π*(θ)}[R] and ∇ℓ (see the module docstring).

    ``reward``: ``"quadratic"`` or ``"bump"``; ``target``: t = θ*; ``curvatures``: aᵢ (quadratic);
    ``bump_width``: w (bump); ``variance``: σ².
    """

    reward: Literal["quadratic", "bump"]
    target: tuple[float, ...]
    curvatures: tuple[float, ...]
    bump_width: float
    variance: float

    @property
    def optimum(self) -> np.ndarray:
        return np.asarray(self.target, dtype=np.float64)

    def reward_fn(self, x: torch.Tensor) -> torch.Tensor:
        """R(x) for particles ``(num_particles, d)`` → ``(num_particles,)``."""
        t = torch.as_tensor(self.target, dtype=x.dtype, device=x.device)
        if self.reward == "quadratic":
            return -((x - t) ** 2 * torch.as_tensor(self.curvatures, dtype=x.dtype, device=x.device)).sum(-1)
        return torch.exp(-((x - t) ** 2).sum(-1) / (2 * self.bump_width**2))

    def loss(self, theta: np.ndarray) -> np.ndarray:
        """ℓ(θ) for θ of shape ``(..., d)``."""
        diff = np.asarray(theta, dtype=np.float64) - self.optimum
        if self.reward == "quadratic":
            return ((diff**2 + self.variance) * np.asarray(self.curvatures)).sum(-1)
        s2 = self.bump_width**2 + self.variance
        return -((self.bump_width**2 / s2) ** (len(self.target) / 2)) * np.exp(-(diff**2).sum(-1) / (2 * s2))

    def grad(self, theta: np.ndarray) -> np.ndarray:
        """∇ℓ(θ), same shape as θ ``(..., d)``.

        >>> p = GaussianRewardProblem("quadratic", (2.0, 1.0), (1.0, 0.1), 1.0, 1.0)
        >>> p.grad(np.array([0.0, 0.0])).tolist()
        [-4.0, -0.2]
        """
        diff = np.asarray(theta, dtype=np.float64) - self.optimum
        if self.reward == "quadratic":
            return 2 * np.asarray(self.curvatures) * diff
        return -self.loss(theta)[..., None] * diff / (self.bump_width**2 + self.variance)
