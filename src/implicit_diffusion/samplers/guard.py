"""An opt-in guard for Langevin-family steps: a particle whose move is non-finite stays put.

A step size too large for a potential, or a potential undefined outside a domain (log-barriers,
square roots), can send single particles to NaN or inf. By default the algorithms let that
happen and the experiments stop on it (:mod:`implicit_diffusion.runtime.guards`); with
:func:`reject_nonfinite` the step keeps each such particle at its previous position instead, and
counts how often it did (``step.rejected``, a 0-d tensor). The resulting chain is no longer the
sampler's chain (a rejected move biases it like a Metropolis rejection without the ratio):
use it to survive rare excursions, not to paper over a step size that is too large.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .langevin import LangevinInfo

__all__ = ["reject_nonfinite"]


def reject_nonfinite(step: Callable) -> Callable:
    """``step`` with the family's signature, except that rows of the new ``x`` ``(N, d)`` holding a
    NaN or inf keep their previous value. ``guarded.rejected`` counts the rejected moves.

    Example:
        >>> import torch
        >>> from implicit_diffusion.samplers import ula_step
        >>> V = lambda x: (x**2).sum(-1) / 2
        >>> step = reject_nonfinite(ula_step)
        >>> x = torch.tensor([[1e30], [1.0]])                    # γ∇V = 1e40 overflows float32 in row 0
        >>> x1, _ = step(x, V, step_size=1e10, noise=torch.zeros(2, 1))
        >>> torch.equal(x1[0], x[0]), x1[1].item(), int(step.rejected)   # row 0 stays; row 1 moves
        (True, -10000000000.0, 1)
    """

    def guarded(x: Tensor, potential, *, step_size: float, generator=None, noise=None,
                **kwargs) -> tuple[Tensor, LangevinInfo]:
        x_new, info = step(x, potential, step_size=step_size, generator=generator, noise=noise, **kwargs)
        ok = torch.isfinite(x_new).reshape(x_new.shape[0], -1).all(1)
        guarded.rejected = guarded.rejected + (~ok).sum()
        return torch.where(ok.reshape(-1, *([1] * (x_new.ndim - 1))), x_new, x), info

    guarded.rejected = torch.zeros((), dtype=torch.int64)
    guarded.__name__ = guarded.__qualname__ = f"reject_nonfinite_{getattr(step, '__name__', 'step')}"
    return guarded
