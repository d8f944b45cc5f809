"""Annealed Langevin dynamics with a noise-conditional score (NCSN; Song & Ermon 2019, Alg. 1).

Noise levels σ_1 > σ_2 > … > σ_L (largest first); level i uses the step size
ε_i = ε₀ σ_i²/σ_L² and runs T steps of

    x⁺ = x + (ε_i/2) s(x, σ_i) + √ε_i z,   z ~ N(0, I),

each level started from the last state of the previous one. The drift follows +∇log p
(the lecture slides' "− ε s(x)" is a sign slip). With ε = 2γ this is ULA on V = −log p_σ:
x − γ∇V + √(2γ) z. T = 1 gives a denoising-diffusion-like sampler.

It is written as a member of the finite-horizon (diffusion) family, so the adjoint
(:mod:`~implicit_diffusion.objectives.adjoint`), the queue and the nested diffusion loop take it
unchanged: the M = L·T steps are indexed m = 0..M−1 (level m // T), and

    annealed_langevin_step(x, model, m, *, schedule, generator=None, noise=None, prediction="score")

calls ``model(x, sigma)`` with σ as a ``(B,)`` tensor in x's dtype. ``schedule.times`` holds the
noise level of every step (its ``(M + 1,)`` length is what the algorithms read; the last entry
repeats σ_L). The Girsanov KL running cost (:mod:`~implicit_diffusion.objectives.girsanov`) is
calibrated for VP schedules and does not apply to this schedule.

Reference: Y. Song & S. Ermon, "Generative modeling by estimating gradients of the data
distribution", NeurIPS 2019, Algorithm 1 (ε₀ = 2e-5, T = 100, σ geometric from 1 to 0.01, L = 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .diffusion import _predict, _step_times, sample
from .langevin import draw_noise
from .schedules import _bcast

__all__ = ["AnnealedSchedule", "annealed_langevin", "annealed_langevin_step"]

Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AnnealedSchedule:
    """The noise levels and step sizes of annealed Langevin dynamics.

    Args:
        sigmas: σ_1 > … > σ_L > 0, strictly decreasing (a sequence or a 1-D tensor; stored as a
            tuple of floats).
        eps0: ε₀ > 0, the step size at the smallest level; level i uses ε_i = ε₀ σ_i²/σ_L².
        steps_per_level: T ≥ 1.

    Attributes used by the algorithms: ``num_steps`` (M = L·T) and ``times`` (float64 ``(M + 1,)``,
    the σ of step m, then σ_L once more). ``step_sizes`` is the float64 ``(M,)`` vector of ε per step.

    Example:
        >>> s = AnnealedSchedule([1.0, 0.5], eps0=0.01, steps_per_level=2)
        >>> s.num_steps, s.times.tolist(), s.step_sizes.tolist()
        (4, [1.0, 1.0, 0.5, 0.5, 0.5], [0.04, 0.04, 0.01, 0.01])
    """

    sigmas: tuple[float, ...]
    eps0: float
    steps_per_level: int = 1

    def __post_init__(self) -> None:
        raw = self.sigmas.detach().cpu().tolist() if isinstance(self.sigmas, Tensor) else self.sigmas
        try:
            sigmas = tuple(float(s) for s in raw)
        except (TypeError, ValueError):
            raise ValueError(f"sigmas must be a 1-D sequence of positive numbers, got {self.sigmas!r}") from None
        if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
            raise ValueError(f"sigmas must be a non-empty sequence of finite numbers > 0, got {list(sigmas)}")
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be strictly decreasing (largest first, σ_1 > … > σ_L), got {list(sigmas)}")
        object.__setattr__(self, "sigmas", sigmas)
        if isinstance(self.eps0, bool) or not (isinstance(self.eps0, (int, float)) and 0 < self.eps0 < math.inf):
            raise ValueError(f"eps0 must be a finite number > 0, got {self.eps0!r}")
        object.__setattr__(self, "eps0", float(self.eps0))
        T = self.steps_per_level
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"steps_per_level must be an integer >= 1, got {T!r}")

    @classmethod
    def geometric(cls, sigma_max: float, sigma_min: float, num_levels: int, eps0: float,
                  steps_per_level: int = 1) -> AnnealedSchedule:
        """Levels in geometric progression from ``sigma_max`` down to ``sigma_min`` (Song & Ermon 2019)."""
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64)
        sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact end points
        return cls(tuple(sigmas.tolist()), eps0, steps_per_level)

    @property
    def num_levels(self) -> int:
        return len(self.sigmas)

    @property
    def num_steps(self) -> int:
        """M = L·T."""
        return self.num_levels * self.steps_per_level

    @property
    def times(self) -> Tensor:
        """σ of every step, float64 ``(M + 1,)``: σ_i repeated T times per level, then σ_L."""
        s = torch.tensor(self.sigmas, dtype=torch.float64)
        return torch.cat([s.repeat_interleave(self.steps_per_level), s[-1:]])

    def step_size(self, sigma):
        """ε(σ) = ε₀ σ²/σ_L² (a float or a tensor, elementwise)."""
        return self.eps0 * sigma**2 / self.sigmas[-1] ** 2

    @property
    def step_sizes(self) -> Tensor:
        """ε of every step, float64 ``(M,)``."""
        return self.step_size(self.times[:-1])


def annealed_langevin_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: AnnealedSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: str = "score",
) -> Tensor:
    """Step m of annealed Langevin dynamics (stochastic): with σ = σ_{i}, i = m // T (0-based),

        x⁺ = x + (ε/2) s(x, σ) + √ε z,   ε = ε₀ σ²/σ_L²,   z ~ N(0, I) (``noise`` or ``generator``).

    ``x``, ``noise``: ``(B, *event)``; ``model(x, sigma)`` gets σ as ``(B,)`` and returns the score
    ∇ₓ log p_σ(x), shape ``(B, *event)``; ``m``: an int in [0, M) or a LongTensor ``(B,)``. Only
    ``prediction="score"`` is supported. Reference: Song & Ermon 2019, Alg. 1.

    Example:
        >>> sch = AnnealedSchedule([2.0, 1.0], eps0=0.1, steps_per_level=1)
        >>> x = torch.ones(2, 3)  # step 0: σ = 2, ε = 0.4; score −x/(1 + σ²) = −0.2
        >>> annealed_langevin_step(x, lambda x, s: -x / (1 + s[:, None] ** 2), 0, schedule=sch,
        ...                        noise=torch.zeros(2, 3))[0].tolist()
        [0.9599999785423279, 0.9599999785423279, 0.9599999785423279]
    """
    if prediction != "score":
        raise ValueError(f"annealed Langevin needs a score model: prediction must be 'score', got {prediction!r}")
    z = draw_noise(x, noise, generator)
    sigma, _ = _step_times(schedule, m, x)  # validates m; σ is 0-dim (int m) or (B,)
    eps = _bcast(schedule.step_size(sigma), x)
    s = _predict(model, x, sigma)
    return x + 0.5 * eps * s + torch.sqrt(eps) * z


def annealed_langevin(
    model: Model,
    x_init: Tensor,
    schedule: AnnealedSchedule,
    *,
    generator: torch.Generator | None = None,
    noises: Tensor | None = None,
    return_trajectory: bool = False,
) -> Tensor | list[Tensor]:
    """All M = L·T steps from ``x_init`` ``(B, *event)``; returns x_M (or the M + 1 states).

    ``noises``: ``(M, B, *event)`` pre-drawn standard normals, else drawn from ``generator``.
    Grad mode belongs to the caller. Same as ``sample(annealed_langevin_step, ...)``.

    Example:
        >>> sch = AnnealedSchedule.geometric(1.0, 0.1, num_levels=3, eps0=1e-3, steps_per_level=5)
        >>> x = annealed_langevin(lambda x, s: -x / (1 + s[:, None] ** 2), torch.zeros(4, 2), sch,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> x.shape
        torch.Size([4, 2])
    """
    return sample(annealed_langevin_step, model, x_init, schedule=schedule, generator=generator, noises=noises,
                  return_trajectory=return_trajectory)
