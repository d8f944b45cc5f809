"""Evaluation of a (finetuned) diffusion model: sample reward and path KL, each with its standard error.

Both are Monte Carlo means over ``n`` independent sampler runs (x_0 ~ N(0, I), fresh noise):

- reward: (1/n) Σ_i R(x_M,i), SE = sd/√n;
- path KL: per run i, K_i = Σ_m ½β(t_m) h_m ‖s_θ(x_m,i, t_m) − s_θ₀(x_m,i, t_m)‖² along the
  sampled path (objectives.girsanov.GirsanovKL, the exact KL of the Euler–Maruyama chains); the
  estimate of KL(path_θ ‖ path_θ₀) is (1/n) Σ_i K_i, SE = sd(K)/√n.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Evaluation", "evaluate", "rise_in_se", "sample_images"]


class Evaluation(NamedTuple):
    reward: float
    reward_se: float
    kl: float
    kl_se: float


def _mean_se(v: Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / v.numel() ** 0.5) if v.numel() > 1 else float("nan")


@torch.no_grad()
def sample_images(model, step, schedule, shape: tuple[int, ...], n: int, *, generator: torch.Generator,
                  prediction: str, chunk: int = 256, dtype: torch.dtype | None = None) -> list[Tensor]:
    """All states x_0..x_M of ``n`` sampler runs, each ``(n, *shape)``, drawn in chunks on the
    generator's device, in ``dtype`` (default: torch's default dtype)."""
    from ..samplers.diffusion import sample

    parts = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        x0 = torch.randn((b, *shape), generator=generator, device=generator.device, dtype=dtype)
        parts.append(sample(step, model, x0, schedule=schedule, generator=generator, prediction=prediction,
                            return_trajectory=True))
    return [torch.cat([p[m] for p in parts]) for m in range(len(parts[0]))]


@torch.no_grad()
def evaluate(model, step, schedule, shape, n: int, *, reward_fn, kl, generator: torch.Generator,
             prediction: str, dtype: torch.dtype | None = None) -> tuple[Evaluation, Tensor]:
    """Reward and path KL of ``n`` fresh samples (on the generator's device, in ``dtype``); also
    returns the samples x_M."""
    states = sample_images(model, step, schedule, shape, n, generator=generator, prediction=prediction, dtype=dtype)
    per_run = sum(w * kl.score_gap(states[m], m) for m, w in enumerate(kl.step_weights))
    rewards = reward_fn(states[-1])
    return Evaluation(*_mean_se(rewards), *_mean_se(per_run)), states[-1]


def rise_in_se(base: Evaluation, final: Evaluation) -> float:
    """(final − base) / √(SE_base² + SE_final²): the rise in standard errors of the difference
    (the two evaluations use independent samples)."""
    return (final.reward - base.reward) / (base.reward_se**2 + final.reward_se**2) ** 0.5
