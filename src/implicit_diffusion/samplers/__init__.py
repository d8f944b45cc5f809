"""Sampler steps and noise schedules. Each family shares one step signature:

- Langevin (:mod:`.langevin`, :mod:`.mala`, :mod:`.preconditioned`, :mod:`.mirror`, :mod:`.proximal`):
  ``step(x, potential, *, step_size, generator=None, noise=None) -> (x, info)`` (MALA also takes
  ``uniform=`` for its accept/reject draw; ``preconditioned_langevin(P)``,
  ``mirror_langevin(domain)`` and ``myula(prox, lam)`` return such a step)
- diffusion (:mod:`.diffusion`): ``step(x, model, m, *, schedule, generator=None, noise=None,
  prediction="score") -> x``
"""

from .diffusion import (
    DIFFUSION_STEPS,
    ddim_step,
    ddpm_step,
    euler_maruyama_step,
    probability_flow_euler_step,
    probability_flow_heun_step,
    sample,
)
from .langevin import LangevinInfo, draw_noise, energy_grad, ula_step
from .mala import mala_step
from .mirror import MIRROR_DOMAINS, mirror_langevin
from .preconditioned import preconditioned_langevin
from .proximal import myula, myula_box, myula_l1, prox_box, prox_l1
from .schedules import VPSchedule, to_epsilon, to_score, to_x0

__all__ = [
    "DIFFUSION_STEPS",
    "LangevinInfo",
    "MIRROR_DOMAINS",
    "VPSchedule",
    "ddim_step",
    "ddpm_step",
    "draw_noise",
    "energy_grad",
    "euler_maruyama_step",
    "mala_step",
    "mirror_langevin",
    "myula",
    "myula_box",
    "myula_l1",
    "preconditioned_langevin",
    "probability_flow_euler_step",
    "probability_flow_heun_step",
    "prox_box",
    "prox_l1",
    "sample",
    "to_epsilon",
    "to_score",
    "to_x0",
    "ula_step",
]
