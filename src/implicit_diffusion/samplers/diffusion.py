"""Denoising-diffusion sampler steps: reverse SDE, probability-flow ODE, DDPM, DDIM.

Every step shares one signature, so the algorithms (nested loop, queue) take any of them::

    step(x, model, m, *, schedule, generator=None, noise=None, prediction="score") -> x_next

- ``x``: ``(B, *event)``, the state at time t_m = ``schedule.times[m]``; ``x_next`` at t_{m+1}.
- ``model(x, t) -> (B, *event)``: any callable; ``t`` is a float tensor ``(B,)`` in x's dtype, and
  its output is a prediction of kind ``prediction`` (``"score"``, ``"epsilon"`` or ``"x0"``,
  converted by :mod:`.schedules`).
- ``m``: an int in [0, M), or a LongTensor ``(B,)`` giving each sample its own step index (the
  queue algorithm advances all its slots in one batched call).
- ``noise``: standard normal of x's shape, else drawn from ``generator``; a stochastic step with
  neither raises ``ValueError`` (never the global RNG). Deterministic steps ignore both.
- Grad mode belongs to the caller: steps are differentiable w.r.t. x and the model's parameters.

Time runs backwards: h = t_m − t_{m+1} > 0, β = β(t_m) (see :class:`.schedules.VPSchedule`).
In the OU convention (β ≡ 2) the reverse SDE is dY = {Y + 2s(Y, T − τ)}dτ + √2 dB and the
probability-flow ODE dY = {Y + s(Y, T − τ)}dτ (Marion et al. 2024, §2 and §4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_output
from .langevin import draw_noise
from .schedules import Prediction, VPSchedule, _bcast, to_epsilon, to_score, to_x0

__all__ = [
    "DIFFUSION_STEPS",
    "DiffusionStep",
    "ddim_step",
    "ddpm_step",
    "euler_maruyama_step",
    "probability_flow_euler_step",
    "probability_flow_heun_step",
    "sample",
]

Model = Callable[[Tensor, Tensor], Tensor]


class DiffusionStep(Protocol):
    """The shared signature of the steps in this module."""

    def __call__(
        self,
        x: Tensor,
        model: Model,
        m: int | Tensor,
        *,
        schedule: VPSchedule,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        prediction: Prediction = "score",
    ) -> Tensor: ...


def _step_times(schedule: VPSchedule, m: int | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(t_m, t_{m+1}) in x's dtype and device: 0-dim for an int m, ``(B,)`` for a per-sample m."""
    M, B = schedule.num_steps, x.shape[0]
    times = schedule.times.to(device=x.device, dtype=x.dtype)
    if isinstance(m, Tensor) and m.ndim > 0:
        if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool or m.shape != (B,):
            raise ValueError(
                f"a per-sample step index m must be an integer tensor of shape ({B},), "
                f"got {m.dtype} of shape {tuple(m.shape)}"
            )
        lo, hi = (int(m.min()), int(m.max())) if B else (0, 0)
        if lo < 0 or hi >= M:
            raise ValueError(f"step indices m must lie in [0, {M}), got values in [{lo}, {hi}]")
        m = m.to(x.device)
        return times[m], times[m + 1]
    bad_tensor = isinstance(m, Tensor) and (m.is_floating_point() or m.dtype == torch.bool)
    if isinstance(m, (bool, float)) or bad_tensor:
        raise ValueError(f"step index m must be an integer in [0, {M}), got {m!r}")
    try:
        i = int(m)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"m must be an int or an integer tensor of shape ({B},), got {m!r}") from None
    if not 0 <= i < M:
        raise ValueError(f"step index m must be an integer in [0, {M}), got {m!r}")
    # 0-dim: the schedule's maths is then done once, not per sample (elementwise maths on an
    # expanded tensor takes a slow path); _predict hands the model a (B,) tensor.
    return times[i], times[i + 1]


def _predict(model: Model, x: Tensor, t: Tensor) -> Tensor:
    """model(x, t) with t as a contiguous ``(B,)`` tensor, its output's shape checked."""
    name = f"model {callable_name(model)}"
    pred = call_user(name, model, x, t if t.ndim else t.expand(x.shape[0]).contiguous())
    return check_output(f"{name} (x, t)", pred, x)


def euler_maruyama_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: Prediction = "score",
) -> Tensor:
    """Euler–Maruyama step of the reverse-time SDE from t_m to t_{m+1} (stochastic).

    x_{m+1} = x + h[½β(t_m) x + β(t_m) s(x, t_m)] + √(β(t_m) h) z,   h = t_m − t_{m+1}, z ~ N(0, I);
    with β ≡ 2 (OU): x + h(x + 2s) + √(2h) z. Shapes: ``x``, ``noise`` ``(B, *event)``.
    Reference: Song et al. 2021 ICLR, eq. 6; Marion et al. 2024, §2.

    Example:
        >>> from implicit_diffusion.samplers.schedules import VPSchedule
        >>> sch = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)  # h = 0.25
        >>> x = torch.ones(2, 3)  # s(x, t) = −x is the exact score for N(0, I) data
        >>> euler_maruyama_step(x, lambda x, t: -x, 0, schedule=sch, noise=torch.zeros(2, 3))[0].tolist()
        [0.75, 0.75, 0.75]
    """
    z = draw_noise(x, noise, generator)
    t, t_next = _step_times(schedule, m, x)
    h, beta = _bcast(t - t_next, x), _bcast(schedule.beta(t), x)
    s = to_score(_predict(model, x, t), x, t, schedule, prediction)
    return x + h * (0.5 * beta * x + beta * s) + torch.sqrt(beta * h) * z


def _pf_drift(model, x, t, schedule, prediction) -> Tensor:
    """½β(t)(x + s(x, t)): the reverse-time probability-flow velocity."""
    s = to_score(_predict(model, x, t), x, t, schedule, prediction)
    return 0.5 * _bcast(schedule.beta(t), x) * (x + s)


def probability_flow_euler_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: Prediction = "score",
) -> Tensor:
    """Euler step of the probability-flow ODE from t_m to t_{m+1} (deterministic; noise ignored).

    x_{m+1} = x + h·½β(t_m)[x + s(x, t_m)];  with β ≡ 2: x + h(x + s). Shapes: ``x`` ``(B, *event)``.
    Reference: Song et al. 2021 ICLR, eq. 13; Marion et al. 2024, §2.
    """
    t, t_next = _step_times(schedule, m, x)
    return x + _bcast(t - t_next, x) * _pf_drift(model, x, t, schedule, prediction)


def probability_flow_heun_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: Prediction = "score",
) -> Tensor:
    """Heun (explicit trapezoidal, 2nd order) step of the probability-flow ODE (deterministic).

    d₁ = ½β(t_m)[x + s(x, t_m)],  x̃ = x + h d₁,  d₂ = ½β(t_{m+1})[x̃ + s(x̃, t_{m+1})],
    x_{m+1} = x + (h/2)(d₁ + d₂).   Two model calls. A step ending where σ(t_{m+1}) = 0 (t_min = 0)
    is an Euler step, d₂ := d₁, since the score is singular there (Karras et al. 2022, Alg. 1).
    Shapes: ``x`` ``(B, *event)``. Reference: Song et al. 2021 ICLR, eq. 13; Karras et al. 2022.
    """
    t, t_next = _step_times(schedule, m, x)
    h = _bcast(t - t_next, x)
    d1 = _pf_drift(model, x, t, schedule, prediction)
    x_tilde = x + h * d1
    # Samples ending at σ = 0 evaluate the model at t instead (a finite, unused value) so that
    # no inf/NaN enters the graph through the discarded branch of `where`.
    regular = schedule.sigma(t_next) > 0
    d2 = _pf_drift(model, x_tilde, torch.where(regular, t_next, t), schedule, prediction)
    d2 = torch.where(_bcast(regular, x), d2, d1)
    return x + 0.5 * h * (d1 + d2)


def ddpm_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: Prediction = "score",
) -> Tensor:
    """Ancestral DDPM step from t_m to t_{m+1} (stochastic).

    α_m = ᾱ(t_m)/ᾱ(t_{m+1}) ≤ 1, β_m = 1 − α_m,
    x_{m+1} = (x − β_m/σ(t_m)·ε̂(x, t_m))/√α_m + σ̃_m z,   σ̃_m² = β_m(1 − ᾱ(t_{m+1}))/(1 − ᾱ(t_m))
    (the posterior variance). Shapes: ``x``, ``noise`` ``(B, *event)``.
    Reference: Ho et al. 2020, Alg. 2 and eq. 7, on the continuous-time grid of the schedule.
    """
    z = draw_noise(x, noise, generator)
    t, t_next = _step_times(schedule, m, x)
    eps = to_epsilon(_predict(model, x, t), x, t, schedule, prediction)
    # Through log ᾱ and expm1: 1 − α_m and 1 − ᾱ without cancellation for small steps / small t.
    log_ab, log_ab_next = schedule.log_alpha_bar(t), schedule.log_alpha_bar(t_next)
    beta_m = -torch.expm1(log_ab - log_ab_next)
    var, var_next = -torch.expm1(log_ab), -torch.expm1(log_ab_next)  # σ(t_m)², σ(t_{m+1})²
    mean = (x - _bcast(beta_m / var.sqrt(), x) * eps) * _bcast(torch.exp(0.5 * (log_ab_next - log_ab)), x)
    return mean + _bcast((beta_m * var_next / var).sqrt(), x) * z


def ddim_step(
    x: Tensor,
    model: Model,
    m: int | Tensor,
    *,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    prediction: Prediction = "score",
) -> Tensor:
    """Deterministic DDIM step (η = 0) from t_m to t_{m+1}; noise and generator are ignored.

    x_{m+1} = √ᾱ(t_{m+1}) x̂₀ + σ(t_{m+1}) ε̂,  x̂₀ = (x − σ(t_m) ε̂)/√ᾱ(t_m),  ε̂ = ε̂(x, t_m).
    Shapes: ``x`` ``(B, *event)``. Reference: Song, Meng & Ermon 2021 (DDIM), eq. 12 with σ_t = 0.
    """
    t, t_next = _step_times(schedule, m, x)
    pred = _predict(model, x, t)
    eps = to_epsilon(pred, x, t, schedule, prediction)
    x0 = to_x0(pred, x, t, schedule, prediction)
    return _bcast(schedule.alpha_bar(t_next).sqrt(), x) * x0 + _bcast(schedule.sigma(t_next), x) * eps


DIFFUSION_STEPS: dict[str, DiffusionStep] = {
    "euler-maruyama": euler_maruyama_step,
    "pf-euler": probability_flow_euler_step,
    "pf-heun": probability_flow_heun_step,
    "ddpm": ddpm_step,
    "ddim": ddim_step,
}


def sample(
    step: DiffusionStep,
    model: Model,
    x_init: Tensor,
    *,
    schedule: VPSchedule | None = None,
    generator: torch.Generator | None = None,
    noises: Tensor | None = None,
    prediction: Prediction | None = None,
    return_trajectory: bool = False,
) -> Tensor | list[Tensor]:
    """Run all M steps from ``x_init`` at t = T (usually N(0, I) draws) to t_min.

    x_{m+1} = step(x_m, model, m, noise=noises[m]) for m = 0..M−1. ``x_init``: ``(B, *event)``;
    ``noises``: ``(M, B, *event)`` or ``None`` (then stochastic steps draw from ``generator``).
    ``model``: a network (``schedule`` required; ``prediction`` default ``"score"``) or a
    :class:`~implicit_diffusion.models.diffusion_model.DiffusionModel`, whose schedule and prediction
    are used (a different ``prediction`` is a ``ValueError``).
    Returns x_M, or with ``return_trajectory=True`` the list [x_0, …, x_M] of M + 1 states.
    Grad mode belongs to the caller (with it on, x_M is differentiable through all the steps).

    Example:
        >>> from implicit_diffusion.samplers.schedules import VPSchedule
        >>> sch = VPSchedule("ou", num_steps=10)
        >>> x = sample(ddpm_step, lambda x, t: -x, torch.zeros(4, 2), schedule=sch,
        ...            generator=torch.Generator().manual_seed(0))
        >>> x.shape
        torch.Size([4, 2])
    """
    model, schedule, prediction = _unwrap(model, schedule, prediction)
    M = schedule.num_steps
    if noises is not None and noises.shape != (M, *x_init.shape):
        raise ValueError(
            f"noises must have shape (num_steps, *x_init.shape) = {(M, *x_init.shape)}, got {tuple(noises.shape)}"
        )
    x = x_init
    trajectory = [x]
    for m in range(M):
        x = step(x, model, m, schedule=schedule, generator=generator,
                 noise=None if noises is None else noises[m], prediction=prediction)
        if return_trajectory:
            trajectory.append(x)
    return trajectory if return_trajectory else x


def _unwrap(model, schedule, prediction):
    """(network, schedule, prediction) of a DiffusionModel (anything with ``net``, ``prediction`` and
    ``schedule``: samplers do not import models) or of a bare network with the given ones."""
    if all(hasattr(model, a) for a in ("net", "prediction", "schedule")) and not isinstance(model, torch.nn.Module):
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the model's prediction {model.prediction!r}; "
                             f"leave prediction out (it is read from the model)")
        return model.net, model.schedule if schedule is None else schedule, model.prediction
    if schedule is None:
        raise TypeError("sample() needs schedule= for a bare network (or pass a DiffusionModel)")
    return model, schedule, "score" if prediction is None else prediction
