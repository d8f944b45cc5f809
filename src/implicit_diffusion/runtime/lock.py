"""One process per run directory: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock``.

``run`` and ``resume`` hold it while they write; a second process on the same directory stops at
once with a one-line :class:`~implicit_diffusion.errors.RunDirError` naming the holder's PID,
instead of appending a second copy of the records to ``metrics.jsonl``. The lock is the
kernel's: it goes away with the process, however that ends (a SIGKILL leaves no stale lock,
only the file, which the next holder reuses). Where ``fcntl`` does not exist (Windows) the
lock is not taken.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RunDirError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunDirLock"]

LOCK_FILE = ".lock"


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the directory's lock; the file records the holder's PID."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run directory {str(self.path.parent)!r} is in use by another process (PID "
                              f"{holder}); wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
