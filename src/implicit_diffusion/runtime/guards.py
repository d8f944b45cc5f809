"""Divergence detection: stop a run within one iteration of particles or θ becoming non-finite.

A step size too large for the potential makes ULA's particles grow geometrically until they
overflow to inf and then NaN, and a NaN reaches θ through the estimator. :class:`DivergenceGuard`
is a loop callback that checks the particles and every parameter after each update (one fused
reduction each: cheap on CPU) and raises :class:`~implicit_diffusion.errors.DivergenceError`
naming the update, what became non-finite and the settings to lower. Placed before the
checkpoint callback, it keeps a non-finite state out of the checkpoint: the last checkpoint is
the last finite one, and the metrics recorded so far stay in the metrics file.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import DivergenceError

__all__ = ["DivergenceGuard"]


class DivergenceGuard:
    """``callback(k, x, stats)``: raise DivergenceError if x (None: no particles to check) or a
    parameter is non-finite.

    Args:
        params: θ (the optimizer's parameters).
        hint: what to suggest, e.g. ``"a smaller step_size (now 0.2) or lr (now 0.1)"``.
    """

    def __init__(self, params: Iterable[Tensor], hint: str):
        self.params = list(params)
        self.hint = hint

    def __call__(self, k: int, x: Tensor | None, stats: dict) -> None:
        finite = torch.isfinite(x).all() if x is not None else torch.ones((), dtype=torch.bool)
        for p in self.params:
            finite = finite & torch.isfinite(p).all()
        if not bool(finite):
            parts = []
            if x is not None and not bool(torch.isfinite(x).all()):
                rows = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1)
                parts.append(f"{int(rows.sum())} of {x.shape[0]} particles")
            if any(not bool(torch.isfinite(p).all()) for p in self.params):
                parts.append("the parameters θ")
            raise DivergenceError(f"the run diverged at update {k + 1}: {' and '.join(parts)} became non-finite "
                                  f"(nan or inf). Try {self.hint}.")
