"""θ's optimizer and learning-rate schedule by name, as ``torch.optim`` objects."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "make_lr_scheduler", "make_optimizer"]

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "inverse-sqrt")


def make_optimizer(name: Literal["sgd", "adam"], params: Iterable[torch.Tensor], lr: float,
                   **options) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``torch.optim.Adam`` over ``params`` at learning rate ``lr``; ``options``
    go to the optimizer (``foreach=False`` suits a θ of a few small tensors: less overhead per step).

    >>> make_optimizer("adam", [torch.zeros(2, requires_grad=True)], 0.1).defaults["lr"]
    0.1
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **options)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **options)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Literal["constant", "inverse-sqrt"]
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``constant``: η (no scheduler); ``inverse-sqrt``: η_k = η/√(k+1) (Marion et al. 2024, §5.1)."""
    if schedule == "constant":
        return None
    if schedule == "inverse-sqrt":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / math.sqrt(k + 1))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
