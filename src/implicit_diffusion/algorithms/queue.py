"""Finite-horizon Implicit Diffusion: the queue of partially sampled batches.

Marion et al. 2024, §4 (finite time): a sampler of M steps x_{m+1} = φ_m(x_m, θ, ξ_m) is kept
busy as a queue of M batches, slot j holding a batch that has undergone j steps. Each
iteration k:

1. a fresh batch x₀ ~ p₀ enters slot 0;
2. every slot advances one step with the current θ_k, **in one batched call** (per-sample
   step index m);
3. the batch that completes its M-th step leaves the queue and gives the gradient Γ_k,
   through the adjoint of its trajectory (objectives.adjoint), and θ_{k+1} = θ_k − η Γ_k.

The adjoint is either a *sequential* sweep over the exiting batch (M backward steps at
once) or *pipelined*: every in-flight adjoint advances one backward step per iteration, in
one batched call, so each iteration costs O(1) batched forward and backward calls. Memory:
M batches in flight plus their stored trajectories, and the activations of one batched call
over all M·B samples — or of at most ``max_batch`` samples when the calls are chunked.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor

from .. import distributed
from ..objectives.adjoint import adjoint_step, terminal_reward_gradient
from .base import clear_grads
from .diffusion_base import DiffusionAlgorithm

__all__ = ["DiffusionQueue"]


class _Flight:
    """One batch in the queue: its states x_0..x_j and the noises that produced them."""

    __slots__ = ("states", "noises")

    def __init__(self, x0: Tensor):
        self.states = [x0]
        self.noises: list[Tensor] = []


class _Adjoint:
    """One exited batch whose adjoint a_{m+1} is being swept backwards (pipelined mode)."""

    __slots__ = ("flight", "a", "m")

    def __init__(self, flight: _Flight, a: Tensor, m: int):
        self.flight, self.a, self.m = flight, a, m


class DiffusionQueue(DiffusionAlgorithm):
    """The queue algorithm with a terminal reward (and an optional running cost).

    Arguments as :class:`~.diffusion_base.DiffusionAlgorithm`, plus ``adjoint``:
    ``"sequential"`` or ``"pipelined"``, and ``max_batch``: the most samples one network call
    takes (the batched forward of all slots, and the batched adjoint step of all in-flight
    sweeps, are split into chunks of at most this many; same result to float rounding, peak
    memory bounded by one chunk's activations instead of M·B samples'). None: one call each.
    """

    def __init__(self, *args, adjoint: Literal["sequential", "pipelined"] = "sequential",
                 max_batch: int | None = None, **kwargs):
        if adjoint not in ("sequential", "pipelined"):
            raise ValueError(f"adjoint must be 'sequential' or 'pipelined', got {adjoint!r}")
        if max_batch is not None and not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
        super().__init__(*args, **kwargs)
        self.adjoint = adjoint
        self.max_batch = max_batch
        self.flights: list[_Flight] = []  # flights[j] has undergone j steps, j < M
        self.adjoints: list[_Adjoint] = []

    # -- checkpoints: the in-flight batches and the pending adjoints ---------------------------
    def state(self, prefix: str = "algo") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint (between iterations): θ and the optimizer (as the base class), plus

        - flight j: its states x_0..x_j stacked, ``{prefix}.flight.{j}.states`` ``(j + 1, batch, *event)``,
          and its noises ξ_0..ξ_{j−1}, ``{prefix}.flight.{j}.noises`` ``(j, batch, *event)``;
        - pending adjoint i (pipelined mode): a_{m+1}, ``{prefix}.adjoint.{i}.a``, and the part of
          its batch's trajectory the rest of its sweep reads, x_0..x_m and ξ_0..ξ_m;

        and in the JSON the number of each and every adjoint's m."""
        tensors, meta = super().state(prefix)
        for j, f in enumerate(self.flights):
            tensors[f"{prefix}.flight.{j}.states"] = torch.stack(f.states)  # stack copies: no shared storage
            if f.noises:
                tensors[f"{prefix}.flight.{j}.noises"] = torch.stack(f.noises)
        for i, j in enumerate(self.adjoints):
            tensors[f"{prefix}.adjoint.{i}.a"] = j.a.detach().clone()
            tensors[f"{prefix}.adjoint.{i}.states"] = torch.stack(j.flight.states[: j.m + 1])
            tensors[f"{prefix}.adjoint.{i}.noises"] = torch.stack(j.flight.noises[: j.m + 1])
        meta.update(adjoint=self.adjoint, flights=[len(f.noises) for f in self.flights],
                    adjoint_steps=[j.m for j in self.adjoints])
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "algo") -> None:
        """Inverse of :meth:`state`; the adjoint mode must be the saved one."""
        if meta["adjoint"] != self.adjoint:
            raise ValueError(f"the saved queue ran the {meta['adjoint']!r} adjoint; this one runs {self.adjoint!r}")
        super().load_state(tensors, meta, prefix)

        def flight(key: str, n_noises: int) -> _Flight:
            f = _Flight(tensors[f"{key}.states"][0])
            f.states = list(tensors[f"{key}.states"].unbind(0))
            f.noises = list(tensors[f"{key}.noises"].unbind(0)) if n_noises else []
            return f

        self.flights = [flight(f"{prefix}.flight.{j}", n) for j, n in enumerate(meta["flights"])]
        self.adjoints = [_Adjoint(flight(f"{prefix}.adjoint.{i}", m + 1), tensors[f"{prefix}.adjoint.{i}.a"], m)
                         for i, m in enumerate(meta["adjoint_steps"])]

    # -- forward: advance every slot by one step in one batched call -------------------------
    def _advance(self, generator: torch.Generator) -> _Flight | None:
        """Insert a fresh batch, advance all slots; return the batch that completed M steps."""
        self.flights.insert(0, _Flight(self.init_fn(generator)))
        xs = torch.cat([f.states[-1] for f in self.flights])
        sizes = [f.states[-1].shape[0] for f in self.flights]
        m = torch.cat([torch.full((n,), len(f.noises), dtype=torch.long) for f, n in zip(self.flights, sizes)])
        noise = torch.randn(xs.shape, generator=generator, dtype=xs.dtype, device=xs.device)
        # Particles carried to the next iteration hold no graph: the gradient comes from the
        # adjoint, which recomputes each step on its own.
        with torch.no_grad():
            ys = torch.cat([self.step_fn(xs[lo:hi], self.model, m[lo:hi], schedule=self.schedule, noise=noise[lo:hi],
                                         prediction=self.prediction) for lo, hi in self._chunks(len(xs))])
        for f, y, n in zip(self.flights, ys.split(sizes), noise.split(sizes)):
            f.states.append(y)
            f.noises.append(n)
        if len(self.flights[-1].noises) == self.num_sampling_steps:
            return self.flights.pop()
        return None

    def _chunks(self, rows: int, sizes: list[int] | None = None) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of at most ``max_batch`` rows covering ``rows`` (one range without
        ``max_batch``); with ``sizes``, ranges end on those item boundaries only (an item larger
        than ``max_batch`` is a range of its own)."""
        if self.max_batch is None or rows <= self.max_batch:
            return [(0, rows)]
        if sizes is None:
            return [(lo, min(lo + self.max_batch, rows)) for lo in range(0, rows, self.max_batch)]
        out, lo, hi = [], 0, 0
        for n in sizes:
            if hi > lo and hi + n - lo > self.max_batch:
                out.append((lo, hi))
                lo = hi
            hi += n
        return [*out, (lo, hi)]

    # -- backward: one adjoint step for a set of (batch, m, a_{m+1}) -------------------------
    def _adjoint_step(self, items: list[tuple[Tensor, Tensor, Tensor, int]]) -> list[Tensor]:
        """For each (x_m, ξ_m, a_{m+1}, m): accumulate (∂θφ_m)ᵀa_{m+1} (+ ∇θc_m) into ``.grad``
        and return a_m, all items in one batched call (objectives.adjoint.adjoint_step), or in
        calls of at most ``max_batch`` samples (the same sums, accumulated chunk by chunk)."""
        sizes = [x.shape[0] for x, _, _, _ in items]
        x = torch.cat([x for x, _, _, _ in items])
        noise = torch.cat([n for _, n, _, _ in items])
        a = torch.cat([a for _, _, a, _ in items])
        m = torch.cat([torch.full((s,), it[3], dtype=torch.long) for s, it in zip(sizes, items)])
        per_sample = getattr(self.running_cost, "per_sample", None)
        if per_sample is not None:  # each particle weighed by 1/(its batch's size): chunks anywhere
            scale = torch.cat([x.new_full((s,), 1.0 / s) for s in sizes])
            chunks = self._chunks(len(x))
        else:  # a cost that takes one integer step index: chunks of whole batches
            chunks = self._chunks(len(x), sizes)
        starts = [0, *itertools.accumulate(sizes)][:-1]
        out = []
        for lo, hi in chunks:
            cost = None
            if per_sample is not None:
                def cost(xs: Tensor, m_all: Tensor, sc: Tensor = scale[lo:hi], **shared) -> Tensor:
                    return (per_sample(xs, m_all, **shared) * sc).sum()  # shared: model_call=, if reused
                cost.reuses_model_output = getattr(self.running_cost, "reuses_model_output", False)
            elif self.running_cost is not None:
                inside = [(i, n) for i, n in enumerate(sizes) if lo <= starts[i] < hi]

                def cost(xs: Tensor, _m: Tensor, inside=inside) -> Tensor:  # one integer step index per batch
                    parts = xs.split([n for _, n in inside])
                    return sum(self.running_cost(part, items[i][3]) for part, (i, _) in zip(parts, inside))
            a_m, _ = adjoint_step(self.step_fn, self.model, m[lo:hi], x[lo:hi], a[lo:hi], noise[lo:hi],
                                  schedule=self.schedule, running_cost=cost, params=self.params,
                                  prediction=self.prediction)
            out.append(a_m)
        return list(torch.cat(out).split(sizes))

    def _sequential_sweep(self, flight: _Flight, a: Tensor) -> None:
        for m in range(self.num_sampling_steps - 1, -1, -1):
            (a,) = self._adjoint_step([(flight.states[m], flight.noises[m], a, m)])

    def _pipelined_sweep(self, exited: _Flight | None, a: Tensor | None) -> None:
        if exited is not None:
            self.adjoints.append(_Adjoint(exited, a, self.num_sampling_steps - 1))
        if not self.adjoints:
            return
        items = [(j.flight.states[j.m], j.flight.noises[j.m], j.a, j.m) for j in self.adjoints]
        new_a = self._adjoint_step(items)
        alive = []
        for j, a_m in zip(self.adjoints, new_a):
            j.a, j.m = a_m, j.m - 1
            if j.m >= 0:
                alive.append(j)
        self.adjoints = alive

    def step(self, k: int, *, generator: torch.Generator) -> dict:
        """One iteration; returns the statistics of the exiting batch (empty while filling)."""
        clear_grads(self.params)
        exited = self._advance(generator)
        stats: dict = {}
        a = None
        if exited is not None:
            terminal = terminal_reward_gradient(self.reward_fn, exited.states[-1], self.reward_weight)
            # sharded batches: the mean reward over all processes' (equal) shares
            a, stats = terminal.grad, {"reward": distributed.global_mean(terminal.reward.reshape(1))}
        if self.adjoint == "sequential":
            if exited is not None:
                self._sequential_sweep(exited, a)
        else:
            self._pipelined_sweep(exited, a)
        self._update()  # no θ update while the queue fills (first M − 1 iterations)
        return stats
