"""Checkpoints: the file format, and checkpointing of a running experiment (every N updates, on Ctrl-C).

**The file.** A checkpoint is one ``.safetensors`` file whose header metadata holds ``format``,
``version`` and ``meta`` (a JSON document: step counter, experiment name, resolved config,
optimizer hyperparameters, ...). Never pickle. It is written to a temporary file beside the
target, flushed to disk and renamed over it, so a crash (even SIGKILL) during the write leaves
the previous checkpoint intact and loadable. The state a run needs becomes tensors + JSON:
a ``torch.Generator``'s state is a uint8 tensor (``get_state``/``set_state``); an optimizer's
state goes through :func:`~implicit_diffusion.serialization.optimizer_state`; a learning-rate
scheduler's ``state_dict()`` is JSON.

**A running experiment.** An experiment that supports checkpoints takes ``checkpoints=`` in its
``run`` and

- adds ``checkpoints.callback(state_fn)`` to its loop's callbacks, where ``state_fn(done, x)``
  returns ``(tensors, meta)``: everything needed to continue after ``done`` θ updates (θ,
  optimizer and scheduler state, particles, generator states, recorders);
- on resume (``checkpoints.resumed`` is not None) loads that state and starts its loop at
  ``checkpoints.start``.

The file (``RUN_DIR/checkpoint.safetensors``) also records the experiment's name, the resolved
config and the length of ``metrics.jsonl`` at the checkpoint, so a resumed run truncates the
metrics to that point and appends exactly what the uninterrupted run would have written.

Ctrl-C (SIGINT), SIGTERM (what schedulers send) and SIGHUP (a closed terminal) during
:meth:`Checkpoints.catch_interrupts` only set a flag; the callback writes a checkpoint after the
current θ update completes and raises :class:`RunInterrupted` (a ``KeyboardInterrupt``, carrying
the signal: the command exits with 128 + its number). A second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError, DataError
from ..serialization import save_tensors
from .config import config_to_dict

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "Checkpoints",
    "NoCheckpoints",
    "RunInterrupted",
    "check_checkpoint_every",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "implicit-diffusion/checkpoint"
# 2: the run state is saved by part (runtime.state); a version-1 checkpoint names its tensors otherwise
_VERSION = "2"


def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-ready ``meta`` to ``path`` atomically (temporary file + rename)."""
    header = {"format": CHECKPOINT_FORMAT, "version": _VERSION, "meta": json.dumps(meta, allow_nan=False)}
    save_tensors(path, tensors, header)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from a checkpoint; a missing, truncated or foreign file is a one-line
    :class:`~implicit_diffusion.errors.DataError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != CHECKPOINT_FORMAT:
                raise DataError(f"{str(path)!r} is not an implicit-diffusion checkpoint "
                                f"(format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
            if header.get("version") != _VERSION:
                raise DataError(f"checkpoint {str(path)!r} has version {header.get('version')!r}; "
                                f"this release reads version {_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"checkpoint {str(path)!r} cannot be read (truncated or corrupted?): "
                        f"{' '.join(str(e).split())}") from None
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise DataError(f"checkpoint {str(path)!r} has a malformed metadata record: {e}") from None
    return tensors, meta


StateFn = Callable[[int, Tensor], tuple[dict[str, Tensor], dict[str, Any]]]


def check_checkpoint_every(every: int) -> None:
    """The config key ``checkpoint_every`` must be >= 0 (0: checkpoints only on Ctrl-C)."""
    if every < 0:
        raise ConfigError(f"config key 'checkpoint_every' must be >= 0 (0 = only on Ctrl-C), got {every}")


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class RunInterrupted(KeyboardInterrupt):
    """A stop signal (``signum``: Ctrl-C's SIGINT by default) arrived; a checkpoint after ``step`` θ
    updates is at ``path``."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after {step} updates; checkpoint written to {path}")
        self.step = step
        self.path = path
        self.signum = int(signum)


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
        self._interrupted: int | None = None  # the stop signal received, if any

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
            if self._interrupted is not None or (self.every and done % self.every == 0):
                self.save(done, x, state_fn)
                if self._interrupted is not None:
                    raise RunInterrupted(done, self.path, self._interrupted)

        return checkpoint

    @contextlib.contextmanager
    def catch_interrupts(self) -> Iterator[None]:
        """Within the block, the first SIGINT, SIGTERM or SIGHUP asks for a checkpoint at the end of the
        current update; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame) -> None:
            if self._interrupted is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._interrupted = signum

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._interrupted = None


class NoCheckpoints:
    """What an experiment uses when it is run without a run directory (``run(config)`` from Python):
    nothing is saved or resumed, and Ctrl-C interrupts at once. It has the interface of
    :class:`Checkpoints`, so a run loop needs no special case."""

    start = 0
    resumed = None

    def callback(self, state_fn: StateFn) -> Callable[[int, Tensor, dict], None]:
        return lambda k, x, stats: None

    def catch_interrupts(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
