"""Run an experiment into a run directory: resolved config, metrics JSONL, results, figures;
and resume one from its checkpoint."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path
from types import ModuleType

from .. import distributed
from ..errors import ConfigError, DataError, ImplicitDiffusionError, RunDirError
from ..serialization import atomic_write_text
from .checkpoints import CHECKPOINT_FILE, Checkpoints, check_meta, load_checkpoint
from .config import build_config, config_to_dict, config_to_toml, load_config_file, without_legacy_sentinels
from .lock import RunDirLock
from .memory import check_config as check_memory
from .rundir import MetricsWriter, prepare_run_dir

__all__ = ["execute", "default_run_dir", "resume"]


def default_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (with a suffix if taken)."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def supports_checkpoints(experiment: ModuleType) -> bool:
    """Whether ``experiment.run`` takes ``checkpoints=`` (see :mod:`.checkpoints`)."""
    return "checkpoints" in inspect.signature(experiment.run).parameters


def execute(experiment: ModuleType, config, run_dir: str | Path, *, name: str | None = None,
            tensorboard: bool = False):
    """``experiment.run`` with metrics streamed to ``metrics.jsonl``, then ``experiment.save``.

    Returns ``(result, files)``. The config is written before the run starts, so a crashed run
    still says what it was. ``tensorboard=True`` mirrors the metrics to ``RUN_DIR/tensorboard``
    (:mod:`.tensorboard`). Experiments that support checkpoints write
    ``checkpoint.safetensors`` every ``config.checkpoint_every`` updates and on Ctrl-C
    (``name`` is stored in it so that :func:`resume` finds the experiment again).
    """
    name = name or experiment.__name__.rsplit(".", 1)[-1]
    device = _device_of(config)  # an absent device is a one-line error before the run directory is made
    check_memory(config, shards=distributed.world_size())  # so is a run that cannot fit in memory
    if tensorboard:
        from .tensorboard import TensorBoardSink  # noqa: F401 - fail early if it is not installed
    if distributed.active():
        return _execute_sharded(experiment, config, run_dir, name, tensorboard, device)
    created = not Path(run_dir).exists()
    run_dir = prepare_run_dir(run_dir)
    try:
        with RunDirLock(run_dir):  # one process per run directory (a concurrent resume is refused)
            _write_run_info(run_dir, name, device)
            atomic_write_text(run_dir / "config.toml", config_to_toml(config))
            return _run(experiment, config, run_dir, name, resumed=None, tensorboard=tensorboard)
    except ImplicitDiffusionError:
        _discard_if_unstarted(run_dir, created)
        raise


_SET_UP_FILES = {"run.json", "config.toml", "metrics.jsonl", ".lock"}


def _discard_if_unstarted(run_dir: Path, created: bool) -> None:
    """After a bad input found once the run had begun (a data file, a model that does not fit the
    experiment) and before it recorded anything, remove what :func:`execute` wrote, so the same
    ``--out`` can be used again; a directory holding anything else (a metric, a checkpoint, a
    figure) is kept as it is."""
    names = {p.name for p in run_dir.iterdir()}
    metrics = run_dir / "metrics.jsonl"
    if not names <= _SET_UP_FILES or (metrics.exists() and metrics.stat().st_size > 0):
        return
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _device_of(config) -> str | None:
    """The device the config's ``device`` key resolves to here (``"cuda:0 (NVIDIA H200)"``), or None
    for an experiment without one; a device that is absent raises a one-line ConfigError."""
    if not hasattr(config, "device"):
        return None
    import torch

    from ..devices import resolve_device

    device = resolve_device(config.device)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _write_run_info(run_dir: Path, name: str, device: str | None) -> None:
    """``run.json``: which experiment made this directory (for ``report``), when, how and where."""
    import json
    import sys

    import torch

    from .. import __version__

    info = {"experiment": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
            "implicit_diffusion": __version__, "torch": torch.__version__}
    if device is not None:
        info["device"] = device
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def _execute_sharded(experiment: ModuleType, config, run_dir: str | Path, name: str, tensorboard: bool,
                     device: str | None):
    """Under torchrun: every process runs its shard; only rank 0 writes (no checkpoints yet).
    Rank 0 prepares the directory first and all processes agree before any collective call,
    so a bad ``--out`` stops them all instead of leaving the others waiting. Experiments that do
    not split their work (no ``SUPPORTS_SHARDING = True``) are refused, on every process."""
    if not getattr(experiment, "SUPPORTS_SHARDING", False):
        raise ConfigError(f"experiment {name!r} does not shard its work over processes; run it without torchrun")
    if getattr(config, "checkpoint_every", None):  # checked on every process alike, before any collective call
        raise ConfigError(f"config key 'checkpoint_every' must be None under torchrun (sharded runs write no "
                          f"checkpoints yet), got {config.checkpoint_every}; run on one process to checkpoint")
    error, lock = None, contextlib.ExitStack()
    if distributed.is_main():  # rank 0 writes, so it holds the directory's lock
        try:
            run_dir = prepare_run_dir(run_dir)
            lock.enter_context(RunDirLock(run_dir))
            _write_run_info(run_dir, name, device)
            atomic_write_text(run_dir / "config.toml", config_to_toml(config))
        except RunDirError as e:
            error = e
    with lock:
        if not distributed.agree(error is None):
            raise error or RunDirError(f"rank 0 could not prepare the output directory {str(run_dir)!r}")
        if not distributed.is_main():
            return experiment.run(config), []
        with MetricsWriter(Path(run_dir) / "metrics.jsonl") as metrics, \
                _Sinks(metrics, run_dir, tensorboard) as sink:
            result = experiment.run(config, metrics_sink=sink)
        return result, ["run.json", "config.toml", "metrics.jsonl", *experiment.save(result, run_dir)]


def resume(run_dir: str | Path, experiments: dict[str, ModuleType], *, device: str | None = None):
    """Continue the run in ``run_dir`` from its checkpoint; returns ``(name, config, result, files)``.

    The metrics file is cut back to its length at the checkpoint, so the finished run's files
    are those an uninterrupted run would have written (bit-identical on the same device).
    ``device``: continue on this device instead of the config's (the checkpoint's tensors are
    placed on it; random streams saved on another device type are re-seeded, see
    :mod:`.state`); ``config.toml`` keeps the run's own.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {str(run_dir)!r} does not exist")
    with RunDirLock(run_dir):  # a second resume (or the run itself, still going) is refused
        return _resume_locked(run_dir, experiments, device)


def _resume_locked(run_dir: Path, experiments: dict[str, ModuleType], device: str | None):
    path = run_dir / CHECKPOINT_FILE
    if (run_dir / "summary.json").exists():  # written last, by experiment.save
        raise RunDirError(f"the run in {str(run_dir)!r} is complete (it has its summary.json); nothing to resume")
    if not path.exists():
        raise RunDirError(f"no checkpoint in {str(run_dir)!r}: nothing to resume (runs write one every "
                          f"--checkpoint-every N updates, and on Ctrl-C)")
    tensors, meta = load_checkpoint(path)
    name = check_meta(meta, path, experiments)["experiment"]  # the record's schema, before anything reads it
    made_by = _run_info_experiment(run_dir)
    if made_by is not None and made_by != name:  # e.g. another run's checkpoint copied in
        raise DataError(f"checkpoint {str(path)!r} is of experiment {name!r}, but the run in {str(run_dir)!r} "
                        f"is of {made_by!r} (its run.json): it is another run's checkpoint")
    experiment = experiments[name]
    on_device = {} if device is None else {"device": device}
    if on_device and not hasattr(experiment.Config, "device"):
        raise ConfigError(f"experiment {name!r} has no device setting")
    saved = without_legacy_sentinels(experiment.Config, load_config_file(run_dir / "config.toml"))
    config = build_config(experiment.Config, saved, on_device)
    _device_of(config)
    check_memory(config)
    # keys a checkpoint of an earlier release does not have read as their defaults (device, dtype)
    defaults = config_to_dict(experiment.Config())
    recorded = without_legacy_sentinels(experiment.Config, meta["config"])
    if {**config_to_dict(config), **on_device} != {**defaults, **recorded, **on_device}:
        raise RunDirError(f"{str(run_dir / 'config.toml')!r} differs from the config saved in the checkpoint; "
                          f"resume needs the run's own config")
    for stale in run_dir.glob(".*.tmp"):  # half-written files of a process killed while writing
        stale.unlink(missing_ok=True)
    metrics, offset = run_dir / "metrics.jsonl", int(meta["metrics_offset"])
    with open(metrics, "r+b") as f:  # drop what was written after the checkpoint
        size = os.fstat(f.fileno()).st_size
        if size < offset:  # never lengthen it (truncate would pad with NUL bytes)
            raise RunDirError(f"{str(metrics)!r} has {size:,} bytes, fewer than the {offset:,} it had at the "
                              f"checkpoint: it was cut or replaced since, and the run cannot continue from it")
        f.truncate(offset)
        os.fsync(f.fileno())
    # a run that wrote TensorBoard events goes on writing them (steps after the checkpoint appear twice)
    result, files = _run(experiment, config, run_dir, name, resumed=(tensors, meta),
                         tensorboard=(run_dir / "tensorboard").is_dir())
    return name, config, result, files


def _run_info_experiment(run_dir: Path) -> str | None:
    """The experiment ``run.json`` says made ``run_dir`` (None without a readable one: an earlier release)."""
    import json

    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = info.get("experiment") if isinstance(info, dict) else None
    return name if isinstance(name, str) else None


class _Sinks:
    """The metrics sink: the JSONL writer, and TensorBoard too when asked for."""

    def __init__(self, metrics: MetricsWriter, run_dir: Path, tensorboard: bool):
        self.metrics = metrics
        self.tb = None
        if tensorboard:
            from .tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(Path(run_dir) / "tensorboard")

    def __call__(self, records) -> None:
        self.metrics.write(records)
        if self.tb is not None:
            self.tb(records)

    def __enter__(self) -> _Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tb is not None:
            self.tb.close()


def _run(experiment: ModuleType, config, run_dir: Path, name: str, resumed, tensorboard: bool = False):
    with MetricsWriter(run_dir / "metrics.jsonl") as metrics, _Sinks(metrics, run_dir, tensorboard) as sink:
        kwargs = {}
        if supports_checkpoints(experiment):
            kwargs["checkpoints"] = Checkpoints(run_dir, getattr(config, "checkpoint_every", None), experiment=name,
                                                config=config, metrics_position=metrics.tell, resumed=resumed)
        result = experiment.run(config, metrics_sink=sink, **kwargs)
    files = ["run.json", "config.toml", "metrics.jsonl", *experiment.save(result, run_dir)]
    if supports_checkpoints(experiment) and (run_dir / CHECKPOINT_FILE).exists():
        files.insert(3, CHECKPOINT_FILE)
    if tensorboard:
        files.insert(3, "tensorboard/")
    return result, files
