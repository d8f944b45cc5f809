"""Run an experiment into a run directory: resolved config, metrics JSONL, results, figures."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType

from ..config import config_to_toml
from ..runio import MetricsWriter, atomic_write_text, prepare_run_dir

__all__ = ["execute", "default_run_dir"]


def default_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (with a suffix if taken)."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def execute(experiment: ModuleType, config, run_dir: str | Path):
    """``experiment.run`` with metrics streamed to ``metrics.jsonl``, then ``experiment.save``.

    Returns ``(result, files)``. The config is written before the run starts, so a crashed run
    still says what it was.
    """
    run_dir = prepare_run_dir(run_dir)
    atomic_write_text(run_dir / "config.toml", config_to_toml(config))
    with MetricsWriter(run_dir / "metrics.jsonl") as metrics:
        result = experiment.run(config, metrics_sink=metrics.write)
    files = ["config.toml", "metrics.jsonl", *experiment.save(result, run_dir)]
    return result, files
