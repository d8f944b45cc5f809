"""What the Langevin-family algorithms share: an optimizer step from a surrogate, and a run loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import Tensor

from ..distributed import all_reduce_grads
from ..objectives.base import Surrogate

__all__ = [
    "NONFINITE",
    "Callback",
    "StepSize",
    "apply_surrogate",
    "clear_grads",
    "resolve_step_size",
    "run_steps",
    "with_acceptance",
]



class Callback(Protocol):
    """What ``run(..., callbacks=[...])`` of every algorithm calls after iteration k: ``callback(k, x, stats)``.

    - ``k``: the iteration (θ-update) index, from ``start``;
    - ``x``: the particles after the iteration, ``(num_particles, *event)`` (Langevin loops, bilevel:
      the inner iterate); ``None`` for the diffusion algorithms, which carry no particle set;
    - ``stats``: a dict of numbers for this iteration. Values are 0-d tensors where they come from the
      particles (read them with ``float(v)``: nothing forces a host sync until then). The keys:

    ==========================================  ==============================================================
    algorithm                                   keys of ``stats``
    ==========================================  ==============================================================
    ``SingleLoop``, ``NestedLoop``              the estimator's: ``reward`` (mean R over the particles,
                                                :class:`~implicit_diffusion.RewardEstimator`), ``energy_gap``
                                                (:class:`~implicit_diffusion.KLToReference`: h̄;
                                                ``ContrastiveKL``: mean V(data) − mean V(particles)),
                                                ``energy_data``, ``energy_particles`` (minibatch
                                                ``ContrastiveKL``); a sum of estimators has all of its
                                                parts' keys; plus ``acceptance_rate`` for a MALA step and
                                                ``update_skipped`` (1.0 / 0.0) with ``nonfinite="skip"``
    ``DiffusionQueue``                          ``reward``: the mean reward of the batch that left the queue
                                                (over all processes); empty ``{}`` while the queue fills
    ``DiffusionNestedLoop``                     ``reward`` (mean R(x_M) of the update's batch),
                                                ``running_cost`` (Σ_m c_m along its path: w·path KL with
                                                :class:`~implicit_diffusion.GirsanovKL`; 0 without a cost)
    ``JointBilevel``, ``NestedBilevel``         ``outer_loss`` f(x), ``gamma_norm`` ‖Γ‖, ``inner_grad_norm``,
                                                ``inner_steps`` and ``hvps`` (totals so far)
    ==========================================  ==============================================================

    Any callable with this signature works (a function, a bound method, a lambda); this Protocol is for
    type checkers and ``help()``. Example::

        rewards = []
        algo.run(100, generator=g, callbacks=[lambda k, x, stats: rewards.append(float(stats.get("reward", 0)))])
    """

    def __call__(self, k: int, x: Tensor | None, stats: dict) -> None: ...


# A sampler step size: a constant, or a function of the θ-update index k.
StepSize = float | Callable[[int], float]


def resolve_step_size(step_size: StepSize, k: int) -> float:
    """γ for θ update k: the constant, or ``step_size(k)`` for a schedule."""
    return step_size(k) if callable(step_size) else step_size


def clear_grads(params: Iterable[Tensor]) -> None:
    """What ``optimizer.zero_grad(set_to_none=True)`` does, without its profiler bookkeeping,
    which costs as much as the rest of a small Langevin step on CPU."""
    for p in params:
        p.grad = None


def with_acceptance(stats: dict, info) -> dict:
    """``stats`` plus the sampler step's ``acceptance_rate`` when it reports one (MALA); the
    same dict otherwise (unadjusted steps report None: nothing is copied on the hot path)."""
    rate = getattr(info, "acceptance_rate", None)
    return stats if rate is None else {**stats, "acceptance_rate": rate}


NONFINITE = ("update", "skip")


def apply_surrogate(potential, surrogate: Surrogate, optimizer: torch.optim.Optimizer, lr_scheduler=None,
                    nonfinite: str = "update") -> bool:
    """θ ← optimizer step with gradient Γ (the gradient of ``surrogate.loss``).

    ``nonfinite="skip"`` rejects an update whose Γ has a NaN or inf entry (θ and the optimizer
    state stay as they were; the learning-rate schedule still advances) and returns False;
    the default applies every update (a non-finite θ is then caught by the experiments'
    divergence guard). Returns whether θ was updated.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clear_grads(params)
    surrogate.backward(potential)
    all_reduce_grads(params)  # sharded particles: sum the processes' shares of Γ (no-op otherwise)
    applied = nonfinite == "update" or all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    if applied:
        optimizer.step()
    else:
        clear_grads(params)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return applied


def run_steps(
    step: Callable[[Tensor | None, int], tuple[Tensor, dict]],
    x: Tensor | None,
    num_steps: int,
    *,
    start: int = 0,
    callbacks: Iterable[Callback] = (),
) -> Tensor | None:
    """Call ``x, stats = step(x, k)`` for k = start … start + num_steps − 1, then each callback."""
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    callbacks = tuple(callbacks)
    for k in range(start, start + num_steps):
        x, stats = step(x, k)
        for cb in callbacks:
            cb(k, x, stats)
    return x
