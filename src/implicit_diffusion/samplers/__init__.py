"""Sampler steps and noise schedules. Each family shares one step signature:

- Langevin (:mod:`.langevin`, :mod:`.mala`, :mod:`.preconditioned`, :mod:`.mirror`, :mod:`.proximal`):
  ``step(x, potential, *, step_size, generator=None, noise=None) -> (x, info)`` (MALA also takes
  ``uniform=`` for its accept/reject draw; ``preconditioned_langevin(P)``,
  ``mirror_langevin(domain)`` and ``myula(prox, lam)`` return such a step;
  ``primal_dual_langevin(D, tv_weight)`` (:mod:`.primal_dual`) returns a step object that also
  holds the dual iterate, with ``reset()``; ``inverse_hessian(V, x)`` gives a Laplace-type P;
  ``reject_nonfinite(step)`` (:mod:`.guard`) keeps particles whose move is non-finite in place)
- diffusion (:mod:`.diffusion`, :mod:`.annealed`): ``step(x, model, m, *, schedule, generator=None,
  noise=None, prediction="score") -> x`` (``annealed_langevin_step`` with an ``AnnealedSchedule``:
  annealed Langevin / NCSN, a score model ``model(x, sigma)``)
"""

from .annealed import AnnealedSchedule, annealed_langevin, annealed_langevin_step
from .diffusion import (
    DIFFUSION_STEPS,
    ddim_step,
    ddpm_step,
    euler_maruyama_step,
    probability_flow_euler_step,
    probability_flow_heun_step,
    sample,
)
from .guard import reject_nonfinite
from .langevin import LangevinInfo, draw_noise, energy_grad, langevin_chain, ula_step
from .mala import mala_step
from .mirror import MIRROR_DOMAINS, mirror_langevin
from .preconditioned import inverse_hessian, preconditioned_langevin
from .primal_dual import (
    LinearOperator,
    PrimalDualLangevin,
    dense_operator,
    finite_difference_1d,
    finite_difference_2d,
    l1_dual_prox,
    primal_dual_langevin,
    quadratic_dual_prox,
)
from .proximal import myula, myula_box, myula_l1, prox_box, prox_l1
from .schedules import VPSchedule, to_epsilon, to_score, to_x0

__all__ = [
    "AnnealedSchedule",
    "DIFFUSION_STEPS",
    "LangevinInfo",
    "LinearOperator",
    "MIRROR_DOMAINS",
    "PrimalDualLangevin",
    "VPSchedule",
    "annealed_langevin",
    "annealed_langevin_step",
    "ddim_step",
    "ddpm_step",
    "dense_operator",
    "draw_noise",
    "energy_grad",
    "euler_maruyama_step",
    "finite_difference_1d",
    "finite_difference_2d",
    "inverse_hessian",
    "langevin_chain",
    "l1_dual_prox",
    "mala_step",
    "mirror_langevin",
    "myula",
    "myula_box",
    "myula_l1",
    "preconditioned_langevin",
    "primal_dual_langevin",
    "probability_flow_euler_step",
    "probability_flow_heun_step",
    "prox_box",
    "prox_l1",
    "reject_nonfinite",
    "quadratic_dual_prox",
    "sample",
    "to_epsilon",
    "to_score",
    "to_x0",
    "ula_step",
]
