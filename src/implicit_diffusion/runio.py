"""Run directories: resolved config, metrics as JSON lines, tensors as safetensors.

Files are written atomically (temporary file in the same directory, then ``os.replace``),
so a crash never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import RunDirError

__all__ = ["prepare_run_dir", "atomic_write_text", "save_tensors", "MetricsWriter"]


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


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a flushed temporary file renamed over it."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _write_atomically(path, write)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors with safetensors (no pickle), atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata=dict(metadata or {})))


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
        """The file's length in bytes: everything written so far is flushed."""
        self._f.flush()
        return os.fstat(self._f.fileno()).st_size

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
