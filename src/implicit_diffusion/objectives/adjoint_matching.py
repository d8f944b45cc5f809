"""Adjoint Matching: reward finetuning as memoryless stochastic optimal control, on a discrete sampler.

Domingo-Enrich, Drozdzal, Karrer & Chen, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative
Models with Memoryless Stochastic Optimal Control", ICLR 2025 (their §4-5: the lean adjoint ODE and the
Adjoint Matching loss; Alg. 1). Target: the tilted law

    p*(x) ∝ p_θ₀(x) · exp((λ/β) R(x)),

the optimum of −λ E_{p_θ}[R] + β KL(path_θ ‖ path_θ₀) — the objective the other finetuning algorithms
of this package minimise. The sampler must be *memoryless* (its x_M independent of x_0 under θ₀);
DDPM ancestral steps are (the paper's "DDPM is memoryless"), so ``ddpm_step`` is the one to use.

Discrete form, for a stochastic step with additive noise, x_{m+1} = μ_θ(x_m, m) + σ_m ξ_m:

- the control u_m(x) = (μ_θ(x, m) − μ_θ₀(x, m)) / σ_m, i.e. the finetuned drift minus the base drift in
  units of the step's noise (KL(path_θ ‖ path_θ₀) = Σ_m ½ E‖u_m(x_m)‖² exactly, Gaussian transitions);
- the path x_0..x_M is drawn with θ (on-policy) and detached;
- the **lean adjoint**, solved backward on that path with the *base* model only (no control terms):
      ã_M = −(λ/β) ∇ₓR(x_M),      ã_m = (∂ₓμ_θ₀(x_m, m))ᵀ ã_{m+1}      (m = M−1, …, 1);
- the **Adjoint Matching loss**, a regression of the control onto the adjoint,
      L(θ) = Σ_{m=0}^{M−1} (1/B) Σ_i ‖u_m(x_m,i) + σ_m ã_{m+1,i}‖²,
  whose minimiser is the optimal control u*_m = −σ_m E[ã_{m+1} | x_m]: the Gaussian transition
  p_θ₀(·|x_m) tilted by E[e^{(λ/β)R(x_M)} | x_{m+1}] has its mean moved by σ_m²∇log of that, which is
  −σ_m² ã_{m+1} (exact for a linear chain and a linear reward; to first order in σ_m otherwise).

∇θL is the update (the surrogate-loss principle: the path and ã are constants of the loss); it is
accumulated into ``.grad`` one step's graph at a time. Network calls per update: M (sampling) + M − 1
base forwards with a vector-Jacobian product (the adjoint) + M of θ and M of θ₀ (the loss), plus one
of each for the noise scales σ_m.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.diffusion_model import DiffusionModel
from .adjoint import _call_step, _differentiable_reward, _resolve_model, _resolve_params

__all__ = ["AdjointMatchingInfo", "adjoint_matching_backward", "frozen_copy", "lean_adjoint", "step_noise_scale"]


class AdjointMatchingInfo(NamedTuple):
    """What :func:`adjoint_matching_backward` reports (all detached, 0-d except ``x_final``).

    ``loss`` = L(θ); ``reward`` the batch-mean R(x_M); ``control_cost`` = Σ_m ½ mean_i ‖u_m‖², the path
    KL(path_θ ‖ path_θ₀) of the drawn path; ``x_final`` the samples x_M ``(B, *event)``."""

    loss: Tensor
    reward: Tensor
    control_cost: Tensor
    x_final: Tensor


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """θ₀: a deep copy of ``model`` with every parameter frozen (``requires_grad = False``)."""
    base = copy.deepcopy(model)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


@torch.no_grad()
def step_noise_scale(step, model, x: Tensor, m: int, *, schedule, **step_kwargs) -> float:
    """σ_m of ``step`` at step m: step(noise = 1) − step(noise = 0), read at the origin and at the first
    sample of ``x`` (one call of batch 2 each, whatever the batch); it must be one positive number there
    (additive noise of a scale that depends on m only; a scale that varies elsewhere in x goes unseen)."""
    x1 = torch.cat([torch.zeros_like(x[:1]), x[:1].detach()])
    mean = _call_step(step, x1, model, m, schedule, torch.zeros_like(x1), step_kwargs)
    scale = _call_step(step, x1, model, m, schedule, torch.ones_like(x1), step_kwargs) - mean
    sigma = float(scale[0].mean())  # at the origin: the same number whatever x
    if not sigma > 0:
        raise ValueError(f"Adjoint Matching needs a stochastic (memoryless) step such as ddpm_step; "
                         f"{getattr(step, '__name__', step)!r} has noise scale {sigma:g} at step {m} (a "
                         f"deterministic step: DDIM, probability flow)")
    rounding = 64 * torch.finfo(scale.dtype).eps * float(mean.abs().max())  # the difference's float error
    if not bool(((scale - sigma).abs() <= 1e-4 * sigma + rounding).all()):
        raise ValueError(f"Adjoint Matching needs additive noise of one scale per step; the noise scale of "
                         f"{getattr(step, '__name__', step)!r} at step {m} varies over x (from "
                         f"{float(scale.min()):g} to {float(scale.max()):g})")
    return sigma


def _mean(step, model, x: Tensor, m: int, schedule, step_kwargs) -> Tensor:
    """μ(x, m): the step without its noise."""
    return _call_step(step, x, model, m, schedule, torch.zeros_like(x), step_kwargs)


def lean_adjoint(step, base_model, states, reward_fn: Callable[[Tensor], Tensor], *, schedule,
                 reward_weight: float, kl_weight: float, **step_kwargs) -> list[Tensor]:
    """[ã_1, …, ã_M], each ``(B, *event)``: ã_M = −(λ/β)∇ₓR(x_M) per sample, ã_m = (∂ₓμ_θ₀(x_m, m))ᵀ ã_{m+1}
    down to m = 1, on the M + 1 ``states`` x_0..x_M (detached first) with the base model ``base_model``."""
    base_model, schedule, step_kwargs = _resolve_model(base_model, schedule, step_kwargs)
    states = [s.detach() for s in states]
    m_total = len(states) - 1
    scale = float(reward_weight) / float(kl_weight)
    with torch.enable_grad():
        x = states[-1].requires_grad_(True)
        (grad,) = torch.autograd.grad(_differentiable_reward(reward_fn, x).sum(), x)
        adjoint = [-scale * grad]
        for m in range(m_total - 1, 0, -1):
            x = states[m].requires_grad_(True)
            (a,) = torch.autograd.grad(_mean(step, base_model, x, m, schedule, step_kwargs), x,
                                       grad_outputs=adjoint[-1])
            adjoint.append(a)
    return adjoint[::-1]


def adjoint_matching_backward(step, model, base_model, x_init: Tensor, noises: Tensor,
                              reward_fn: Callable[[Tensor], Tensor], *, schedule=None, reward_weight: float = 1.0,
                              kl_weight: float = 1.0, params: Iterable[Tensor] | None = None,
                              noise_scales: list[float] | None = None, **step_kwargs) -> AdjointMatchingInfo:
    """∇θ of the Adjoint Matching loss (module docstring) into the parameters' ``.grad``.

    Args:
        step: a stochastic sampler step ``step(x, model, m, *, schedule, noise, **step_kwargs)`` with
            additive noise (``ddpm_step``).
        model: the network being finetuned (θ), or a DiffusionModel holding it.
        base_model: θ₀, frozen (:func:`frozen_copy` of the model before finetuning).
        x_init: x_0 ``(B, *event)``; noises: ``(M, B, *event)``, the path's ξ_m.
        reward_fn: ``R(x) -> (B,)``, differentiable in x.
        reward_weight, kl_weight: λ and β > 0 (the target tilt is λ/β).
        params: the tensors to differentiate (default: the model's parameters that require grad).
        noise_scales: σ_0..σ_{M−1} if known (else read from the step, :func:`step_noise_scale`).
    """
    if not kl_weight > 0:
        raise ValueError(f"kl_weight (β) must be > 0 for Adjoint Matching (its target is p₀·e^{{(λ/β)R}}), "
                         f"got {kl_weight!r}")
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    base_model = base_model.net if isinstance(base_model, DiffusionModel) else base_model
    params = _resolve_params(model, params)
    m_total = len(noises)
    if noise_scales is None:
        noise_scales = [step_noise_scale(step, base_model, x_init, m, schedule=schedule, **step_kwargs)
                        for m in range(m_total)]
    with torch.no_grad():  # the on-policy path, a constant of the loss
        states = [x_init.detach()]
        for m in range(m_total):
            states.append(_call_step(step, states[-1], model, m, schedule, noises[m], step_kwargs))
    adjoint = lean_adjoint(step, base_model, states, reward_fn, schedule=schedule, reward_weight=reward_weight,
                           kl_weight=kl_weight, **step_kwargs)
    loss = control = states[0].new_zeros((), dtype=torch.float64)
    for m in range(m_total):
        sigma, x = noise_scales[m], states[m]
        with torch.no_grad():
            base_mean = _mean(step, base_model, x, m, schedule, step_kwargs)
        with torch.enable_grad():
            u = (_mean(step, model, x, m, schedule, step_kwargs) - base_mean) / sigma
            loss_m = (u + sigma * adjoint[m]).pow(2).flatten(1).sum(1).mean()
            if loss_m.requires_grad:
                loss_m.backward(inputs=params)
        loss = loss + loss_m.detach().double()
        control = control + 0.5 * u.detach().pow(2).flatten(1).sum(1).mean().double()
    with torch.no_grad():
        reward = reward_fn(states[-1]).mean()
    return AdjointMatchingInfo(loss, reward.detach(), control, states[-1])
