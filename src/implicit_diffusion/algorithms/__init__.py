"""Algorithms that compose a sampler, an estimator and a torch.optim optimizer."""

from .nested import NestedLoop
from .schedules import LR_SCHEDULES, make_lr_scheduler
from .single_loop import SingleLoop

__all__ = ["LR_SCHEDULES", "NestedLoop", "SingleLoop", "make_lr_scheduler"]
