"""Checkpoints of a running experiment: every N θ updates, on Ctrl-C, and the state to resume from.

An experiment that supports checkpoints takes ``checkpoints=`` in its ``run`` and

- adds ``checkpoints.callback(state_fn)`` to its loop's callbacks, where ``state_fn(done, x)``
  returns ``(tensors, meta)``: everything needed to continue after ``done`` θ updates (θ,
  optimizer and scheduler state, particles, generator states, recorders);
- on resume (``checkpoints.resumed`` is not None) loads that state and starts its loop at
  ``checkpoints.start``.

The file (``RUN_DIR/checkpoint.safetensors``, see :mod:`implicit_diffusion.checkpoint`) also
records the experiment's name, the resolved config and the length of ``metrics.jsonl`` at
the checkpoint, so a resumed run truncates the metrics to that point and appends exactly what
the uninterrupted run would have written.

Ctrl-C (SIGINT) during :meth:`Checkpoints.catch_interrupts` only sets a flag; the callback
writes a checkpoint after the current θ update completes and raises :class:`RunInterrupted`
(a ``KeyboardInterrupt``). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import save_checkpoint
from ..config import config_to_dict
from ..errors import ConfigError

__all__ = ["CHECKPOINT_FILE", "Checkpoints", "RunInterrupted", "check_checkpoint_every"]

CHECKPOINT_FILE = "checkpoint.safetensors"

StateFn = Callable[[int, Tensor], tuple[dict[str, Tensor], dict[str, Any]]]


def check_checkpoint_every(every: int) -> None:
    """The config key ``checkpoint_every`` must be >= 0 (0: checkpoints only on Ctrl-C)."""
    if every < 0:
        raise ConfigError(f"config key 'checkpoint_every' must be >= 0 (0 = only on Ctrl-C), got {every}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C was pressed; a checkpoint after ``step`` θ updates is at ``path``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted after {step} updates; checkpoint written to {path}")
        self.step = step
        self.path = path


class Checkpoints:
    """Checkpointing of one run.

    Args:
        run_dir: the run directory (the checkpoint is ``run_dir / CHECKPOINT_FILE``).
        every: write a checkpoint every this many θ updates (0: only on Ctrl-C).
        experiment: the experiment's name (``resume`` looks it up).
        config: the resolved config (stored, and compared on resume).
        metrics_position: returns the current length of the metrics file (after a flush).
        resumed: ``(tensors, meta)`` of the checkpoint to continue from, or None.
    """

    def __init__(self, run_dir: str | Path, every: int, *, experiment: str, config: Any,
                 metrics_position: Callable[[], int] = lambda: 0,
                 resumed: tuple[dict[str, Tensor], dict[str, Any]] | None = None):
        check_checkpoint_every(every)
        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.every = every
        self.experiment = experiment
        self.config = config
        self.metrics_position = metrics_position
        self.resumed = resumed
        self._interrupted = False

    @property
    def start(self) -> int:
        """θ updates already done: 0 for a fresh run, the checkpoint's step on resume."""
        return int(self.resumed[1]["step"]) if self.resumed else 0

    @property
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The experiment's own ``(tensors, meta)`` saved by ``state_fn`` (resume only)."""
        if self.resumed is None:
            raise RuntimeError("not resuming: there is no saved state")
        return self.resumed[0], self.resumed[1]["state"]

    def save(self, done: int, x: Tensor, state_fn: StateFn) -> None:
        tensors, state = state_fn(done, x)  # recorders flush to the metrics file here
        meta = {"experiment": self.experiment, "step": done, "config": config_to_dict(self.config),
                "metrics_offset": self.metrics_position(), "state": state}
        save_checkpoint(self.path, tensors, meta)

    def callback(self, state_fn: StateFn) -> Callable[[int, Tensor, dict], None]:
        """A loop callback: checkpoint after update k when k + 1 is a multiple of ``every``, or on Ctrl-C."""

        def checkpoint(k: int, x: Tensor, stats: dict) -> None:
            done = k + 1
            if self._interrupted or (self.every and done % self.every == 0):
                self.save(done, x, state_fn)
                if self._interrupted:
                    raise RunInterrupted(done, self.path)

        return checkpoint

    @contextlib.contextmanager
    def catch_interrupts(self) -> Iterator[None]:
        """Within the block, the first SIGINT asks for a checkpoint at the end of the current update."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame) -> None:
            if self._interrupted:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._interrupted = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._interrupted = False
