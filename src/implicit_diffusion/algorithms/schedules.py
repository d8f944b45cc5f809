"""Learning-rate schedules for θ, as ``torch.optim.lr_scheduler`` objects."""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["LR_SCHEDULES", "make_lr_scheduler"]

LR_SCHEDULES = ("constant", "inverse-sqrt")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Literal["constant", "inverse-sqrt"]
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``constant``: η (no scheduler); ``inverse-sqrt``: η_k = η/√(k+1) (Marion et al. 2024, §5.1)."""
    if schedule == "constant":
        return None
    if schedule == "inverse-sqrt":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / math.sqrt(k + 1))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
