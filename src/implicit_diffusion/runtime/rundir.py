"""Run directories: created empty (nothing is overwritten), metrics appended as JSON lines.

The resolved config, results and figures are written atomically with
:func:`~implicit_diffusion.serialization.atomic_write_text` /
:func:`~implicit_diffusion.serialization.save_tensors`; ``summary.json`` is written last
(:func:`write_summary`), so its presence marks a complete run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import RunDirError
from ..serialization import atomic_write_text

__all__ = ["prepare_run_dir", "MetricsWriter", "write_summary"]


def prepare_run_dir(path: str | Path) -> Path:
    """Create ``path`` (or accept it empty); refuse a non-empty directory so nothing is overwritten."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise RunDirError(f"output path {str(path)!r} exists and is not a directory")
        if any(path.iterdir()):
            raise RunDirError(f"output directory {str(path)!r} is not empty; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output directory {str(path)!r}: {e.strerror}") from None
    return path


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> str:
    """Write ``summary.json`` (indented JSON); returns its file name. Experiments call this last in
    their ``save``: a summary marks the run complete (``resume`` refuses to continue it)."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return "summary.json"


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Append JSON records (one per line) to ``metrics.jsonl``; flushed after each block."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]] | dict[str, Any]) -> None:
        if isinstance(records, dict):
            records = [records]
        self._f.write("".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in records))
        self._f.flush()

    def tell(self) -> int:
        """The file's length in bytes, after flushing and syncing everything written so far to disk
        (a checkpoint records it: the records it counts must survive a power loss)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return os.fstat(self._f.fileno()).st_size

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
