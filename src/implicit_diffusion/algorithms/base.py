"""What the Langevin-family algorithms share: an optimizer step from a surrogate, and a run loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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

# callback(k, particles, stats) after θ update k; stats hold 0-d tensors (no host sync).
Callback = Callable[[int, Tensor, dict], None]
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
