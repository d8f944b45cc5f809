"""Algorithms that compose a sampler, an estimator and a torch.optim optimizer."""

from .diffusion_nested import DiffusionNestedLoop
from .nested import NestedLoop
from .queue import DiffusionQueue
from .schedules import LR_SCHEDULES, make_lr_scheduler
from .single_loop import SingleLoop

__all__ = ["LR_SCHEDULES", "DiffusionNestedLoop", "DiffusionQueue", "NestedLoop", "SingleLoop", "make_lr_scheduler"]
