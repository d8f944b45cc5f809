"""Denoising score matching for variance-preserving diffusions.

With x_t = √ᾱ(t) x₀ + σ(t) n, n ~ N(0, I), σ(t) = √(1 − ᾱ(t)), the multi-level DSM loss with
weighting λ(t) = σ(t)² (paper-notes §2; Vincent 2011; Song & Ermon 2019; Ho et al. 2020) is

    L(θ) = E_t E_{x₀} E_n ‖σ(t) s_θ(x_t, t) + n‖² = E_t E_{x₀} E_n ‖ε̂_θ(x_t, t) − n‖²,

the second form with the noise prediction ε̂ = −σ s. It is minimised by s_θ = ∇log q_t (the
exact score of the noised data), i.e. ε̂*(x, t) = −σ(t)∇log q_t(x). t is drawn uniformly on
[t_min, T]; a model of any prediction kind is converted to ε̂ first.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dsm_loss"]


def dsm_loss(
    model,
    x0: Tensor,
    schedule,
    *,
    generator: torch.Generator,
    t: Tensor | None = None,
    prediction: str | None = None,
) -> Tensor:
    """Monte Carlo estimate of L(θ) on a batch ``x0`` of shape ``(batch, *event)``.

    ``t`` (``(batch,)``) defaults to U[times[-1], times[0]] draws; ``prediction`` defaults to the
    model's ``prediction`` attribute. Returns a scalar (mean over the batch of ‖ε̂ − n‖² summed
    over event dimensions).
    """
    from ..samplers.schedules import to_epsilon

    if generator is None:
        raise ValueError("dsm_loss needs generator=torch.Generator(): library code never uses the global RNG")
    kind = prediction or getattr(model, "prediction", None)
    if kind is None:
        raise ValueError("pass prediction= ('epsilon', 'score' or 'x0'): the model has no 'prediction' attribute")
    b = x0.shape[0]
    if t is None:
        t_lo, t_hi = float(schedule.times[-1]), float(schedule.times[0])
        u = torch.rand(b, generator=generator, dtype=x0.dtype, device=x0.device)
        t = t_lo + (t_hi - t_lo) * u
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    xt = schedule.marginal(x0, t, noise)
    eps_hat = to_epsilon(model(xt, t), xt, t, schedule, kind)
    return (eps_hat - noise).pow(2).flatten(1).sum(1).mean()
