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

The pipelined update. Write b_e for the batch that exits at iteration e, a^e_{m+1} its adjoint
(a^e_M = ∇ₓΦ(x_M) = −λ∇ₓ mean R) and g^e_m = (∂θφ_m(x^e_m, θ_k, ξ^e_m))ᵀ a^e_{m+1} + ∇θc_m its
step-m contribution, computed at iteration k = e + M − 1 − m with the θ_k of that iteration.
Iteration k sums one step of every in-flight adjoint:

    Γ_k = Σ_{m = 0}^{M−1} g^{k−(M−1−m)}_m      (the terms whose batch has exited, e ≤ k),

so once M adjoints are in flight each step index m = 0..M−1 appears exactly once, each from a
different batch. The two edges of the pipeline:

- **fill** (``fill``): the first M − 1 iterations with an exit have fewer than M adjoints in
  flight, and their Γ_k lacks the low step indices (the sum above with only e ≥ first exit).
  ``"wait"`` (default) computes those adjoint steps (their a_m are needed) but discards their θ
  gradients: no θ update until the gradient is complete, i.e. until M adjoints are in flight,
  the first update at iteration 2(M − 1) after the queue starts empty; M(M − 1)/2 batch-step
  contributions of the first M − 1 batches are discarded. ``"partial"`` applies them (the
  behaviour before the option existed): the first M − 1 updates are partial gradients.
  The condition is the number of in-flight adjoints, part of the checkpointed state, so
  :meth:`DiffusionQueue.state` needs nothing more and a resumed run continues bit for bit.
- **tail** (``tail``): after the last iteration M − 1 adjoints are still in flight, holding
  :meth:`DiffusionQueue.pending_contributions` = Σ (m + 1) = M(M − 1)/2 batch-step contributions
  of the last M − 1 batches. :meth:`DiffusionQueue.drain` either drops them (``"drop"``, the
  default: nothing happens) or applies them (``"apply"``): it runs the remaining backward steps
  with no new forward batches, one θ update per drain iteration with what is available
  (partial gradients: M − 1, M − 2, …, 1 of the M step indices), M − 1 updates in all.

For the sequential adjoint both options are no-ops: each θ update is one exited batch's full
gradient Σ_m g^k_m, and nothing is in flight after the last iteration.

Staleness. Batch b_e's forward step m runs at iteration e − (M − 1) + m with θ of that
iteration; its pipelined adjoint step m runs at e + M − 1 − m, so the θ in g^e_m is

    2(M − 1 − m) iterations newer than the forward's     (at most 2(M − 1), at m = 0),

(θ changes only at the iterations where an update is applied: none during a ``"wait"`` fill).
The sequential adjoint runs every step at the exit iteration e: staleness M − 1 − m.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .. import distributed
from ..models.diffusion_model import DiffusionModel
from ..objectives.adjoint import adjoint_step, terminal_reward_gradient
from ..samplers.diffusion import DiffusionStep
from ..samplers.schedules import Prediction, VPSchedule
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

    Arguments as :class:`~.diffusion_base.DiffusionAlgorithm`, plus

    - ``adjoint``: ``"sequential"`` or ``"pipelined"`` (see the module docstring);
    - ``max_batch``: the most samples one network call takes (the batched forward of all slots,
      and the batched adjoint step of all in-flight sweeps, are split into chunks of at most
      this many; same result to float rounding, peak memory bounded by one chunk's activations
      instead of M·B samples'). None: one call each;
    - ``fill`` (pipelined): ``"wait"`` (default) applies no θ update until M adjoints are in
      flight, so every update holds each step index once; ``"partial"`` applies the fill's
      partial gradients;
    - ``tail`` (pipelined): what :meth:`drain`, run after the last iteration, does with the
      adjoints still in flight: ``"drop"`` (default) or ``"apply"``.

    Both ``fill`` and ``tail`` are no-ops for the sequential adjoint. Particles are
    ``(batch, *event)`` as ``init_fn`` draws them, on the model's device, with the generator
    passed to :meth:`step` on that device too (the queue draws the step noises with it).

    Example (the 1-D Gaussian of tests/test_queue.py; M = 4, pipelined, fill and tail explicit):
        >>> import torch
        >>> from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step
        >>> class Score(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.theta = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        ...     def forward(self, x, t):
        ...         return -(x - self.theta * torch.exp(-t)[:, None])
        >>> model = Score()
        >>> queue = DiffusionQueue(model, euler_maruyama_step, VPSchedule("ou", num_steps=4),
        ...                        torch.optim.SGD(model.parameters(), lr=0.05),
        ...                        init_fn=lambda g: torch.randn(8, 1, generator=g, dtype=torch.float64),
        ...                        reward_fn=lambda x: -(x[:, 0] - 2.0) ** 2, adjoint="pipelined",
        ...                        fill="wait", tail="apply")
        >>> queue.run(6, generator=torch.Generator().manual_seed(0))
        >>> model.theta.item()  # exits at iterations 3, 4, 5: 3 < M adjoints in flight, no update yet
        0.0
        >>> queue.pending_contributions()  # step 0 of the 1st batch, steps 1, 0 of the 2nd, 2, 1, 0 of the 3rd
        6
        >>> queue.drain(), queue.pending_contributions()
        (3, 0)
    """

    def __init__(
        self,
        model: torch.nn.Module | DiffusionModel,
        step: DiffusionStep,
        schedule: VPSchedule | torch.optim.Optimizer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        init_fn: Callable[[torch.Generator], Tensor],
        reward_fn: Callable[[Tensor], Tensor],
        reward_weight: float = 1.0,
        running_cost: Callable[[Tensor, int], Tensor] | None = None,
        prediction: Prediction | None = None,
        max_grad_norm: float | None = None,
        adjoint: Literal["sequential", "pipelined"] = "sequential",
        max_batch: int | None = None,
        fill: Literal["wait", "partial"] = "wait",
        tail: Literal["drop", "apply"] = "drop",
    ):
        if adjoint not in ("sequential", "pipelined"):
            raise ValueError(f"adjoint must be 'sequential' or 'pipelined', got {adjoint!r}")
        if max_batch is not None and not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
        if fill not in ("wait", "partial"):
            raise ValueError(f"fill must be 'wait' or 'partial', got {fill!r}")
        if tail not in ("drop", "apply"):
            raise ValueError(f"tail must be 'drop' or 'apply', got {tail!r}")
        super().__init__(model, step, schedule, optimizer, init_fn=init_fn, reward_fn=reward_fn,
                         reward_weight=reward_weight, running_cost=running_cost, prediction=prediction,
                         max_grad_norm=max_grad_norm)
        self.adjoint = adjoint
        self.max_batch = max_batch
        self.fill = fill
        self.tail = tail
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
        """Inverse of :meth:`state`; the adjoint mode must be the saved one. The batches and adjoints
        are placed on the model's device (a checkpoint written on one device loads on another)."""
        if meta["adjoint"] != self.adjoint:
            raise ValueError(f"the saved queue ran the {meta['adjoint']!r} adjoint; this one runs {self.adjoint!r}")
        super().load_state(tensors, meta, prefix)
        device = self.params[0].device if self.params else torch.device("cpu")
        tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith(f"{prefix}.flight.")
                   or k.startswith(f"{prefix}.adjoint.")}

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
        # step indices on the CPU, whatever the particles' device: the step checks their range there
        # without waiting for the device, and moves them once (samplers.diffusion._step_times)
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
        m = torch.cat([torch.full((s,), it[3], dtype=torch.long) for s, it in zip(sizes, items)])  # CPU: see _advance
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

    def _pipelined_sweep(self, exited: _Flight | None, a: Tensor | None) -> int:
        """Advance every in-flight adjoint (and the just exited one) by one backward step,
        accumulating their θ gradients; return how many were advanced (M once the queue is full)."""
        if exited is not None:
            self.adjoints.append(_Adjoint(exited, a, self.num_sampling_steps - 1))
        if not self.adjoints:
            return 0
        swept = len(self.adjoints)
        items = [(j.flight.states[j.m], j.flight.noises[j.m], j.a, j.m) for j in self.adjoints]
        new_a = self._adjoint_step(items)
        alive = []
        for j, a_m in zip(self.adjoints, new_a):
            j.a, j.m = a_m, j.m - 1
            if j.m >= 0:
                alive.append(j)
        self.adjoints = alive
        return swept

    def pending_contributions(self) -> int:
        """Batch-step contributions g^e_m still owed by the in-flight adjoints: Σ (m + 1) over
        them, M(M − 1)/2 after any iteration once the queue is full (pipelined; 0 sequential).
        What :meth:`drain` applies with ``tail="apply"`` and leaves out with ``"drop"``."""
        return sum(j.m + 1 for j in self.adjoints)

    def drain(self) -> int:
        """Run after the last iteration: settle the adjoints still in flight as ``tail`` says.

        ``tail="apply"``: advance them with no new forward batch, one θ update per drain
        iteration from what is available (partial gradients: the i-th drain update holds the
        step indices 0..M − 1 − i of the last M − i batches' remaining steps, M − 1 updates
        once the queue was full), until none is left. ``tail="drop"``, and the sequential
        adjoint: nothing happens (the state is kept, so a run continued afterwards equals a
        longer one). Returns the number of θ updates made; :meth:`pending_contributions`
        before the call says how many batch-step contributions were applied or dropped."""
        if self.tail == "drop":
            return 0
        updates = 0
        while self.adjoints:
            clear_grads(self.params)
            self._pipelined_sweep(None, None)
            self._update()
            updates += 1
        return updates

    def step(self, k: int, *, generator: torch.Generator) -> dict:
        """One iteration; returns the statistics of the exiting batch (empty while filling).

        θ is updated once a gradient is available: from the first exit (iteration M − 1) on,
        or, pipelined with ``fill="wait"``, from iteration 2(M − 1) on."""
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
        elif self._pipelined_sweep(exited, a) < self.num_sampling_steps and self.fill == "wait":
            # fewer than M adjoints in flight: Γ_k lacks the low step indices. Their a_m were
            # needed (the sweeps go on); their θ gradients are discarded, not applied.
            clear_grads(self.params)
        self._update()  # no gradient yet while the queue fills (first M − 1 iterations): no update
        return stats
