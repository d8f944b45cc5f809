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
- on resume (``checkpoints.resumed`` is not None) loads that state with
  ``checkpoints.restore(parts, ..., num_steps=N)`` (checked first, see below) and starts its
  loop at ``checkpoints.start``;
- calls ``checkpoints.bind_data(name, tensor, where)`` once for the data (or starting weights) it
  trains on.

The file (``RUN_DIR/checkpoint.safetensors``) also records the experiment's name, the resolved
config and the length of ``metrics.jsonl`` at the checkpoint, so a resumed run truncates the
metrics to that point and appends exactly what the uninterrupted run would have written.

**What is trusted.** Nothing in the file: :func:`check_meta` checks the record's schema
(experiment, step, metrics_offset, config, state) when it is read; :meth:`Checkpoints.restore`
checks the saved tensors against the live objects before loading them
(:func:`~implicit_diffusion.runtime.state.load_state_of`), and the step against the loop's
length; :meth:`Checkpoints.bind_data` records a fingerprint of the data (or weights) a run
starts from and refuses to resume when they have changed. Each failure is a one-line
:class:`~implicit_diffusion.errors.DataError` naming the file.

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
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError, DataError
from ..serialization import save_tensors
from .config import config_to_dict
from .state import check_like, fingerprint, load_state_of, unpack

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "Checkpoints",
    "NoCheckpoints",
    "RunInterrupted",
    "check_checkpoint_every",
    "check_meta",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "implicit-diffusion/checkpoint"
# 2: the run state is saved by part (runtime.state); a version-1 checkpoint names its tensors otherwise.
# 3: fingerprints of the training data (or starting weights) in meta["data"]; version 2 has none
_VERSION = "3"


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else f"a JSON {_JSON_NAMES.get(type(value), type(value).__name__)}"


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def check_meta(meta: Any, path: str | Path, experiments: Collection[str] | None = None) -> dict[str, Any]:
    """``meta`` (a checkpoint's record) if it has the schema :meth:`Checkpoints.save` writes: experiment
    (a string, one of ``experiments`` when given), step (an integer >= 0; its upper bound is the
    loop's, checked by :meth:`Checkpoints.restore`), metrics_offset (an integer >= 0), config and
    state (JSON objects), data (fingerprints, optional); else a one-line DataError."""
    where = f"checkpoint {str(path)!r}"
    if not isinstance(meta, dict):
        raise DataError(f"{where}: its metadata must be a JSON object, got {_kind(meta)}")
    for key in ("experiment", "step", "metrics_offset", "config", "state"):
        if key not in meta:
            raise DataError(f"{where}: meta {key!r} is missing")
    name = meta["experiment"]
    if not isinstance(name, str):
        raise DataError(f"{where}: meta 'experiment' must be a string, got {_kind(name)}")
    if experiments is not None and name not in experiments:
        raise DataError(f"{where}: meta 'experiment' is {name!r}, not a known experiment; "
                        f"known: {', '.join(sorted(experiments))}")
    if not _is_int(meta["step"]) or meta["step"] < 0:
        raise DataError(f"{where}: meta 'step' must be an integer >= 0, got {meta['step']!r}")
    if not _is_int(meta["metrics_offset"]) or meta["metrics_offset"] < 0:
        raise DataError(f"{where}: meta 'metrics_offset' must be an integer >= 0 (bytes of metrics.jsonl), "
                        f"got {meta['metrics_offset']!r}")
    for key in ("config", "state"):
        if not isinstance(meta[key], dict):
            raise DataError(f"{where}: meta {key!r} must be a JSON object, got {_kind(meta[key])}")
    data = meta.get("data", {})
    if not (isinstance(data, dict) and all(isinstance(v, str) for v in data.values())):
        raise DataError(f"{where}: meta 'data' must map names to fingerprints (strings), got {_kind(data)}")
    return meta


def check_checkpoint_every(every: int | None) -> None:
    """The config key ``checkpoint_every`` must be None (checkpoints only on a stop signal) or >= 1."""
    if every is not None and not every >= 1:
        raise ConfigError(f"config key 'checkpoint_every' must be None (checkpoints only on Ctrl-C, SIGTERM or "
                          f"SIGHUP) or an integer >= 1, got {every}")


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
        every: write a checkpoint every this many θ updates (None: only on Ctrl-C, SIGTERM or SIGHUP).
        experiment: the experiment's name (``resume`` looks it up).
        config: the resolved config (stored, and compared on resume).
        metrics_position: returns the current length of the metrics file (after a flush).
        resumed: ``(tensors, meta)`` of the checkpoint to continue from, or None.
    """

    def __init__(self, run_dir: str | Path, every: int | None, *, experiment: str, config: Any,
                 metrics_position: Callable[[], int] = lambda: 0,
                 resumed: tuple[dict[str, Tensor], dict[str, Any]] | None = None):
        check_checkpoint_every(every)
        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.every = every
        self.experiment = experiment
        self.config = config
        self.metrics_position = metrics_position
        if resumed is not None:
            check_meta(resumed[1], self.path)
        self.resumed = resumed
        self._interrupted: int | None = None  # the stop signal received, if any
        self._data: dict[str, str] = {}  # fingerprints of what the run started from (bind_data)

    @property
    def source(self) -> str:
        """How messages name the checkpoint: ``"checkpoint 'RUN_DIR/checkpoint.safetensors'"``."""
        return f"checkpoint {str(self.path)!r}"

    @property
    def start(self) -> int:
        """θ updates already done: 0 for a fresh run, the checkpoint's step on resume."""
        return int(self.resumed[1]["step"]) if self.resumed else 0

    def bind_data(self, name: str, value: Tensor | Mapping[str, Tensor], where: str) -> None:
        """Tie the run to the data (or weights) ``value`` it starts from, called once at the start of
        ``run``: a fingerprint (:func:`~implicit_diffusion.runtime.state.fingerprint`) goes into every
        checkpoint, and on resume it must be the one saved, else a one-line DataError naming
        ``where`` (a path, or how the data were made). ``name`` says what it is ("training data")."""
        now = fingerprint(value)
        if self.resumed is not None:
            saved = self.resumed[1].get("data", {}).get(name)
            if saved is None:
                raise DataError(f"{self.source} has no fingerprint of the {name}; it cannot show that the "
                                f"{name} are the run's ({where})")
            if saved != now:
                raise DataError(f"the {name} differ from the run's: fingerprint {saved[:16]} at the checkpoint, "
                                f"{now[:16]} now ({where})")
        self._data[name] = now

    def require(self, meta: Any, where: str = "state", **types: type | tuple[type, ...]) -> dict[str, Any]:
        """``meta`` (a part of the saved state) if it is a JSON object holding each key of ``types`` with a
        value of that type (float accepts integers; bool is never an integer); else a one-line DataError."""
        if not isinstance(meta, dict):
            raise DataError(f"{self.source}: meta {where!r} must be a JSON object, got {_kind(meta)}")
        for key, kind in types.items():
            declared = kind if isinstance(kind, tuple) else (kind,)
            accepted = (*declared, int) if float in declared else declared
            value = meta.get(key)
            if key not in meta or not isinstance(value, accepted) or (isinstance(value, bool) and bool not in declared):
                names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in declared)
                got = "nothing" if key not in meta else _kind(value)
                raise DataError(f"{self.source}: meta '{where}.{key}' must be a JSON {names}, got {got}")
        return meta

    def restore(self, parts: Mapping[str, Any], meta: Any = None, prefix: str = "", *, num_steps: int,
                like: Mapping[str, Tensor | None] | None = None) -> None:
        """Load the saved state into the live ``parts`` (:func:`~implicit_diffusion.runtime.state.load_state_of`,
        which first checks it against them), for a loop of ``num_steps`` updates: the checkpoint's
        step must be within it. ``meta``: the parts' records (default: the whole saved state)."""
        tensors, state = self.state
        step = self.resumed[1]["step"]
        if not 0 <= step <= num_steps:
            raise DataError(f"{self.source}: meta 'step' must be an integer from 0 to {num_steps}, got {step!r}")
        load_state_of(parts, tensors, state if meta is None else meta, prefix, like=like, source=self.source,
                      exhaustive=True)

    def check_like(self, where: str, value: Any, example: Any) -> None:
        """A restored record shaped like ``example`` (:func:`~implicit_diffusion.runtime.state.check_like`),
        else a one-line DataError naming the file."""
        check_like(self.source, where, value, example)

    def unpack(self, tree: Any, into: Callable[..., Any] | None = None, many: bool = False) -> Any:
        """:func:`~implicit_diffusion.runtime.state.unpack` of a record in the saved state (``into(**value)``
        when given: a dataclass; with ``many``, a list of them), a malformed one being a one-line
        DataError naming the file."""
        def build(value: Any) -> Any:
            if not isinstance(value, dict):
                raise DataError(f"expected a packed {into.__name__}, got {type(value).__name__}")
            return into(**value)

        try:
            value = unpack(tree, self.state[0])
            if into is None:
                return value
            if not many:
                return build(value)
            if not isinstance(value, list):
                raise DataError(f"expected a packed list of {into.__name__}, got {type(value).__name__}")
            return [build(v) for v in value]
        except DataError as e:
            raise DataError(f"{self.source}: {e}") from None
        except TypeError as e:  # into(**value) with other fields
            raise DataError(f"{self.source}: a packed record does not fit {into.__name__}: {e}") from None

    @property
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The experiment's own ``(tensors, meta)`` saved by ``state_fn`` (resume only)."""
        if self.resumed is None:
            raise RuntimeError("not resuming: there is no saved state")
        return self.resumed[0], self.resumed[1]["state"]

    def save(self, done: int, x: Tensor, state_fn: StateFn) -> None:
        # the recorders' state: a recorder holding records back hands them to the metrics file first, which
        # through the run's OrderedSink keeps the file in step order (runtime.recording), then its length
        tensors, state = state_fn(done, x)
        meta = {"experiment": self.experiment, "step": done, "config": config_to_dict(self.config),
                "metrics_offset": self.metrics_position(), "state": state, "data": dict(self._data)}
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

    def bind_data(self, name: str, value: Any, where: str) -> None:
        pass  # nothing is saved: nothing to compare with

    def callback(self, state_fn: StateFn) -> Callable[[int, Tensor, dict], None]:
        return lambda k, x, stats: None

    def catch_interrupts(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
