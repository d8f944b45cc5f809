"""Estimators Γ(p, θ) written as surrogate losses (DESIGN.md §2.1).

For a Gibbs target π*(θ) ∝ exp(−V(x, θ)), every estimator of Marion et al. 2024, §3, is a
weighted sum of parameter gradients of the potential at fixed points:

    Γ(p, θ) = Σⱼ wⱼ ∇θV(yⱼ, θ)  =  ∇θ [ Σⱼ wⱼ V(yⱼ, θ) ]   (yⱼ, wⱼ held fixed).

An estimator returns a :class:`Surrogate` record holding the points, the (detached)
weights and the statistics it computed on the way. ``surrogate.loss(potential)`` is the
scalar whose ``backward()`` gives Γ (so any ``torch.optim`` optimizer, gradient clipping or
hooks work); ``surrogate.backward(potential)`` adds the same Γ to ``.grad`` through the
potential's closed form when it has one. Estimators add up: ``a + b`` is the estimator of
F_a + F_b, since Γ is linear in F.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_values

__all__ = ["Surrogate", "Estimator", "SumEstimator"]


class Surrogate(NamedTuple):
    """Γ as fixed points ``(n_j, dim)`` with weights ``(n_j,)``, plus statistics (0-d tensors)."""

    points: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    stats: dict[str, Tensor]

    def loss(self, potential) -> Tensor:
        """Σⱼ wⱼ V(yⱼ, θ): its gradient w.r.t. θ is Γ. Points and weights are constants."""
        name = f"potential {callable_name(potential)}"
        return sum(
            (w.detach() * check_values(name, call_user(name, potential, y.detach()), y)).sum()
            for y, w in zip(self.points, self.weights)
        )

    def backward(self, potential) -> None:
        """Add Γ to the ``.grad`` of the potential's parameters (closed form if available).

        Potentials without ``accumulate_param_grad`` (any ``nn.Module`` returning energies)
        get ``self.loss(potential).backward()``.
        """
        accumulate = getattr(potential, "accumulate_param_grad", None)
        if accumulate is None:
            with torch.enable_grad():
                self.loss(potential).backward()
            return
        for y, w in zip(self.points, self.weights):
            accumulate(y, w)


class Estimator:
    """Base class: ``estimator(potential, x) -> Surrogate`` for particles ``x`` ~ p ≈ π*(θ)."""

    def __call__(self, potential, x: Tensor) -> Surrogate:  # pragma: no cover - interface
        raise NotImplementedError

    def __add__(self, other: Estimator) -> SumEstimator:
        if not isinstance(other, Estimator):
            return NotImplemented
        return SumEstimator(self, other)


class SumEstimator(Estimator):
    """Γ of F₁ + F₂ + …: concatenates the surrogates' points and weights, merges statistics."""

    def __init__(self, *estimators: Estimator):
        flat: list[Estimator] = []
        for e in estimators:
            flat.extend(e.estimators if isinstance(e, SumEstimator) else (e,))
        self.estimators = tuple(flat)

    def __call__(self, potential, x: Tensor) -> Surrogate:
        parts = [e(potential, x) for e in self.estimators]
        stats: dict[str, Tensor] = {}
        for p in parts:
            stats.update(p.stats)
        return Surrogate(
            tuple(y for p in parts for y in p.points), tuple(w for p in parts for w in p.weights), stats
        )
