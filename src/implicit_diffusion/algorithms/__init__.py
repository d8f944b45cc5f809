"""Algorithms that compose a sampler, an estimator and a torch.optim optimizer."""

from .bilevel import JointBilevel, NestedBilevel
from .diffusion_adjoint_matching import DiffusionAdjointMatching
from .diffusion_nested import DiffusionNestedLoop
from .nested import NestedLoop
from .optim import LR_SCHEDULES, OPTIMIZERS, make_lr_scheduler, make_optimizer
from .queue import DiffusionQueue
from .single_loop import SingleLoop

__all__ = [
    "DIFFUSION_ALGORITHMS",
    "DiffusionAdjointMatching",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "DiffusionNestedLoop",
    "DiffusionQueue",
    "JointBilevel",
    "NestedBilevel",
    "NestedLoop",
    "SingleLoop",
    "make_lr_scheduler",
    "make_optimizer",
]

# name → (class, options): the finite-horizon algorithms, as the diffusion experiments name them
DIFFUSION_ALGORITHMS = {
    "queue-pipelined": (DiffusionQueue, {"adjoint": "pipelined"}),
    "queue-sequential": (DiffusionQueue, {"adjoint": "sequential"}),
    "nested-adjoint": (DiffusionNestedLoop, {"gradient": "adjoint"}),
    "nested-autograd": (DiffusionNestedLoop, {"gradient": "autograd"}),
    "draft-k": (DiffusionNestedLoop, {"gradient": "autograd"}),  # with last_k = K (the experiments' draft_k)
    "adjoint-matching": (DiffusionAdjointMatching, {}),  # with kl_weight = β
}
