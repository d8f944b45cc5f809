"""Algorithms that compose a sampler, an estimator and a torch.optim optimizer."""

from .bilevel import JointBilevel, NestedBilevel
from .diffusion_nested import DiffusionNestedLoop
from .nested import NestedLoop
from .queue import DiffusionQueue
from .schedules import LR_SCHEDULES, make_lr_scheduler
from .single_loop import SingleLoop

__all__ = [
    "LR_SCHEDULES",
    "DiffusionNestedLoop",
    "DiffusionQueue",
    "JointBilevel",
    "NestedBilevel",
    "NestedLoop",
    "SingleLoop",
    "make_lr_scheduler",
]
