"""Loop callbacks that record: per-step statistics, periodic evaluations, running means.

Callbacks have the signature ``callback(k, particles, stats)`` and run after θ update k (see
:mod:`implicit_diffusion.algorithms.base`). Per-step statistics stay on the device in a
preallocated buffer and leave it in blocks, so the loop never waits on a host synchronisation.
Every recorder has ``state(prefix)`` / ``load_state(tensors, meta, prefix)`` for checkpoints
(:func:`~implicit_diffusion.runtime.state.state_of`).

**Order.** A run's recorders share one :class:`OrderedSink`, so that ``metrics.jsonl`` holds the
records in the order they were made (step order), whatever ``checkpoint_every`` is and whether
the run was interrupted and resumed: a recorder that keeps records back (per-step rewards, which
leave the device in blocks) hands them over before any later record is written, and at each
checkpoint (so a stopped run's file is complete up to its checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .state import pack, unpack

__all__ = ["EvalRecorder", "OrderedSink", "RewardRecorder", "RunningMean"]

Sink = Callable[[list[dict]], None]


class OrderedSink:
    """The one way a run's records reach its metrics sink: in the order they were made.

    A recorder that keeps records back registers its ``flush`` with :meth:`hold`; before any
    record is written, the held recorder hands over everything it has recorded, so the sink sees
    the records in the order an unbuffered run would write them (``{"step": 9, "reward": …}``
    before the evaluation after update 9, ``{"step": 10, …}``). What is held goes out only when a
    block fills, when another record is written, when a checkpoint is taken or at the end
    (:meth:`flush`); whichever it is, every record follows those made before it, so
    ``metrics.jsonl`` is the same, byte for byte, with checkpoints every N updates or none, and
    after a resume.

    >>> lines = []
    >>> sink = OrderedSink(lines.extend)
    >>> rewards = RewardRecorder(4, sink)  # registers itself: its sink is an OrderedSink
    >>> for k in range(2):
    ...     rewards(k, None, {"reward": 0.5 * k})
    >>> sink([{"step": 2, "exact_reward": 1.0}])  # an evaluation after update 1
    >>> [r["step"] for r in lines]
    [0, 1, 2]
    """

    def __init__(self, sink: Sink):
        self._sink = sink
        self._held: Callable[[], None] | None = None

    def hold(self, flush: Callable[[], None]) -> Sink:
        """Register the ``flush`` of the recorder that keeps records back; returns the sink that
        ``flush`` writes to (the wrapped one: its own records must not trigger it again). One per
        sink: with two, each would hold the other's records out of order."""
        if self._held is not None:
            raise ValueError("this OrderedSink already has a recorder that holds records back; give the "
                             "second one its own sink")
        self._held = flush
        return self._sink

    def flush(self) -> None:
        """Have the held recorder hand over everything it has recorded."""
        if self._held is not None:
            self._held()

    def __call__(self, records: list[dict]) -> None:
        self.flush()
        if records:
            self._sink(records)


class RewardRecorder:
    """Keeps ``stats["reward"]`` of every step; hands ``{"step", "reward"}`` records to ``sink`` per block.

    The buffer moves to the device of the first reward tensor it is given, so recording a step
    does not wait for the device; only a block's hand-over reads the values back. With an
    :class:`OrderedSink` as ``sink``, the recorder registers with it, and so also hands its
    records over before any other record is written (step order)."""

    def __init__(self, num_steps: int, sink: Sink, *, block: int = 1000, dtype: torch.dtype = torch.float32):
        self._buf = torch.full((num_steps,), float("nan"), dtype=dtype)
        self._sink = sink
        self._block = block
        self._flushed = 0
        self.count = 0  # steps recorded so far
        if isinstance(sink, OrderedSink):
            self._sink = sink.hold(self.flush)

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        value = stats["reward"]
        if isinstance(value, Tensor) and value.device != self._buf.device:
            self._buf = self._buf.to(value.device)
        self._buf[k] = value
        self.count = k + 1
        if self.count % self._block == 0:
            self.flush()

    def flush(self) -> None:
        """Hand over every recorded step not yet handed over (also after an interruption)."""
        upto = self.count
        if upto > self._flushed:
            vals = self._buf[self._flushed:upto].tolist()
            self._sink([{"step": self._flushed + i, "reward": v} for i, v in enumerate(vals)])
            self._flushed = upto

    def values(self) -> np.ndarray:
        return self._buf.double().cpu().numpy().copy()

    def state(self, prefix: str = "rewards") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint: everything recorded so far, handed to the sink first, so that the metrics
        file of a run that is stopped and never resumed is complete up to here. Through an
        :class:`OrderedSink` this does not change the file's order (every record is in step order
        whenever the held ones go out), so the file is the same with checkpoints or without."""
        self.flush()
        return {prefix: self._buf[: self.count].clone()}, {"count": self.count, "flushed": self._flushed}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "rewards") -> None:
        """Resume: the steps recorded before the checkpoint; those not yet in the metrics file go
        out later, as in the uninterrupted run."""
        n = int(meta["count"])
        self._buf[:n] = tensors[prefix]
        self.count = n
        flushed = int(meta.get("flushed", n))  # a checkpoint of an earlier release had flushed all
        if not 0 <= flushed <= n:
            raise ValueError(f"'flushed' must be from 0 to the {n} steps recorded, got {flushed}")
        self._flushed = flushed


class EvalRecorder:
    """Evaluations every ``every`` steps, after the last update, and snapshots at chosen steps.

    Steps are counted in the run's own unit: update k (0-based) ends at step
    ``done = (k + 1)·steps_per_update`` (sampler steps when ``steps_per_update`` is the number of
    sampler steps per θ update, θ updates when it is 1). An evaluation is due when ``done`` crosses
    a multiple of ``every``, or after update ``num_updates − 1``; :meth:`record` also evaluates on
    demand (the initial state, step 0).

    An evaluation calls ``measure(done, x) -> {name: number or array}``, keeps each value
    (``values[name]``, in step order, with ``steps``) and hands ``{**labels, step_key: done, **values}``
    to ``sink`` (arrays as lists). At the steps in ``snapshot_steps`` (evaluated or not) it also keeps
    ``snapshot(done, x)`` (arrays, tensors, tuples of them) in ``snapshots[done]``. ``seconds`` is the
    time spent evaluating (so that a loop's timing can leave it out).
    """

    def __init__(self, measure: Callable[[int, Tensor], dict[str, Any]], every: int, num_updates: int, sink: Sink, *,
                 steps_per_update: int = 1, step_key: str = "step", labels: dict[str, Any] | None = None,
                 snapshot: Callable[[int, Tensor], Any] | None = None, snapshot_steps: Iterable[int] = ()):
        self.measure, self.every, self.num_updates, self.sink = measure, every, num_updates, sink
        self.steps_per_update, self.step_key, self.labels = steps_per_update, step_key, dict(labels or {})
        self.snapshot, self.snapshot_steps = snapshot, set(snapshot_steps)
        self.steps: list[int] = []
        self.values: dict[str, list] = {}
        self.snapshots: dict[int, Any] = {}
        self.seconds = 0.0

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        done = (k + 1) * self.steps_per_update
        if done // self.every > (done - self.steps_per_update) // self.every or k + 1 == self.num_updates:
            self.record(done, x)
        elif done in self.snapshot_steps:
            self._snapshot(done, x)

    def record(self, done: int, x: Tensor) -> None:
        """Evaluate now, at step ``done`` (and take the snapshot if ``done`` is a snapshot step)."""
        start = time.perf_counter()
        values = self.measure(done, x)
        self.steps.append(done)
        for name, value in values.items():
            self.values.setdefault(name, []).append(value)
        self.sink([{**self.labels, self.step_key: done,
                    **{n: v.tolist() if isinstance(v, np.ndarray) else v for n, v in values.items()}}])
        self._snapshot(done, x)
        self.seconds += time.perf_counter() - start

    def _snapshot(self, done: int, x: Tensor) -> None:
        if self.snapshot is not None and done in self.snapshot_steps:
            self.snapshots[done] = self.snapshot(done, x)

    def column(self, name: str) -> np.ndarray:
        """``values[name]`` as an array, one row per evaluation."""
        return np.array(self.values.get(name, []))

    def state(self, prefix: str = "evals") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint: the evaluations and snapshots so far."""
        tensors, tree = pack({"values": self.values, "snapshots": self.snapshots}, prefix)
        return tensors, {"steps": self.steps, "seconds": self.seconds, "packed": tree}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "evals") -> None:
        saved = unpack(meta["packed"], tensors)
        self.values, self.snapshots = saved["values"], saved["snapshots"]
        self.steps, self.seconds = list(meta["steps"]), meta["seconds"]


class RunningMean:
    """Callback: the mean of ``stats[key]`` over the updates that report it (None if none did)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        value = stats.get(self.key)
        if value is not None:
            self.total = self.total + value  # stays on the device: no host sync per step
            self.count += 1

    def mean(self) -> float | None:
        return float(self.total) / self.count if self.count else None

    def state(self, prefix: str) -> tuple[dict[str, Tensor], dict]:
        return {f"{prefix}.total": torch.as_tensor(self.total).clone()}, {"count": self.count}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str) -> None:
        self.count = int(meta["count"])
        self.total = tensors[f"{prefix}.total"] if self.count else 0.0
