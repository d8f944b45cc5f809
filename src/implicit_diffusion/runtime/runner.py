"""Run an experiment into a run directory: resolved config, metrics JSONL, results, figures;
and resume one from its checkpoint."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from types import ModuleType

from .. import distributed
from ..errors import ConfigError, RunDirError
from ..serialization import atomic_write_text
from .checkpoints import CHECKPOINT_FILE, Checkpoints, load_checkpoint
from .config import build_config, config_to_dict, config_to_toml, load_config_file
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
    if tensorboard:
        from .tensorboard import TensorBoardSink  # noqa: F401 - fail early if it is not installed
    if distributed.active():
        return _execute_sharded(experiment, config, run_dir, name, tensorboard)
    run_dir = prepare_run_dir(run_dir)
    _write_run_info(run_dir, name)
    atomic_write_text(run_dir / "config.toml", config_to_toml(config))
    return _run(experiment, config, run_dir, name, resumed=None, tensorboard=tensorboard)


def _write_run_info(run_dir: Path, name: str) -> None:
    """``run.json``: which experiment made this directory (for ``report``), when and how."""
    import json
    import sys

    from .. import __version__

    info = {"experiment": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
            "implicit_diffusion": __version__}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def _execute_sharded(experiment: ModuleType, config, run_dir: str | Path, name: str, tensorboard: bool):
    """Under torchrun: every process runs its shard; only rank 0 writes (no checkpoints yet).
    Rank 0 prepares the directory first and all processes agree before any collective call,
    so a bad ``--out`` stops them all instead of leaving the others waiting. Experiments that do
    not split their work (no ``SUPPORTS_SHARDING = True``) are refused, on every process."""
    if not getattr(experiment, "SUPPORTS_SHARDING", False):
        raise ConfigError(f"experiment {name!r} does not shard its work over processes; run it without torchrun")
    error = None
    if distributed.is_main():
        try:
            run_dir = prepare_run_dir(run_dir)
            _write_run_info(run_dir, name)
            atomic_write_text(run_dir / "config.toml", config_to_toml(config))
        except RunDirError as e:
            error = e
    if not distributed.agree(error is None):
        raise error or RunDirError(f"rank 0 could not prepare the output directory {str(run_dir)!r}")
    if not distributed.is_main():
        return experiment.run(config), []
    with MetricsWriter(Path(run_dir) / "metrics.jsonl") as metrics, _Sinks(metrics, run_dir, tensorboard) as sink:
        result = experiment.run(config, metrics_sink=sink)
    return result, ["run.json", "config.toml", "metrics.jsonl", *experiment.save(result, run_dir)]


def resume(run_dir: str | Path, experiments: dict[str, ModuleType]):
    """Continue the run in ``run_dir`` from its checkpoint; returns ``(name, config, result, files)``.

    The metrics file is cut back to its length at the checkpoint, so the finished run's files
    are those an uninterrupted run would have written (bit-identical on CPU).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / CHECKPOINT_FILE
    if (run_dir / "summary.json").exists():  # written last, by experiment.save
        raise RunDirError(f"the run in {str(run_dir)!r} is complete (it has its summary.json); nothing to resume")
    if not path.exists():
        raise RunDirError(f"no checkpoint in {str(run_dir)!r}: nothing to resume (runs write one every "
                          f"--checkpoint-every N updates, and on Ctrl-C)")
    tensors, meta = load_checkpoint(path)
    name = meta.get("experiment")
    if name not in experiments:
        raise RunDirError(f"checkpoint in {str(run_dir)!r} is for unknown experiment {name!r}; "
                          f"known: {', '.join(sorted(experiments))}")
    experiment = experiments[name]
    config = build_config(experiment.Config, load_config_file(run_dir / "config.toml"))
    if config_to_dict(config) != meta["config"]:
        raise RunDirError(f"{str(run_dir / 'config.toml')!r} differs from the config saved in the checkpoint; "
                          f"resume needs the run's own config")
    for stale in run_dir.glob(".*.tmp"):  # half-written files of a process killed while writing
        stale.unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "r+b") as f:  # drop what was written after the checkpoint
        f.truncate(int(meta["metrics_offset"]))
        os.fsync(f.fileno())
    # a run that wrote TensorBoard events goes on writing them (steps after the checkpoint appear twice)
    result, files = _run(experiment, config, run_dir, name, resumed=(tensors, meta),
                         tensorboard=(run_dir / "tensorboard").is_dir())
    return name, config, result, files


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
            kwargs["checkpoints"] = Checkpoints(run_dir, getattr(config, "checkpoint_every", 0), experiment=name,
                                                config=config, metrics_position=metrics.tell, resumed=resumed)
        result = experiment.run(config, metrics_sink=sink, **kwargs)
    files = ["run.json", "config.toml", "metrics.jsonl", *experiment.save(result, run_dir)]
    if supports_checkpoints(experiment) and (run_dir / CHECKPOINT_FILE).exists():
        files.insert(3, CHECKPOINT_FILE)
    if tensorboard:
        files.insert(3, "tensorboard/")
    return result, files
