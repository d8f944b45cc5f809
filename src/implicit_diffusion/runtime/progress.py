"""What a long run says while it works: a progress bar as a loop callback (tqdm, imported only when
a bar is shown), and a status line for a long step that has no loop of its own."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from torch import Tensor

__all__ = ["ProgressBar", "status"]


@contextlib.contextmanager
def status(message: str, *, enabled: bool = True) -> Iterator[None]:
    """Say on stderr what the block is doing before it starts, and how long it took when it ends
    ("implicit-diffusion: evaluating the pretrained model (256 samples, 50 steps)… 41.2 s, CPU 80.3 s"),
    so a set-up of minutes is not silent. Nothing when ``enabled`` is false.

    >>> with status("counting", enabled=False):
    ...     pass
    """
    if not enabled:
        yield
        return
    print(f"implicit-diffusion: {message}…", end="", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    except BaseException:
        print(" stopped", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s", file=sys.stderr,
          flush=True)


class ProgressBar:
    """A tqdm bar as a loop callback, updated every ``chunk`` steps to keep the loop cheap."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, chunk: int = 50, initial: int = 0):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.chunk = chunk
        self._bar = None
        self._shown = initial  # a resumed run starts part-way

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="step", leave=False, dynamic_ncols=True,
                             initial=self._shown)
        return self

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        if self._bar is not None and (k + 1) % self.chunk == 0:
            self._bar.update(k + 1 - self._shown)
            self._shown = k + 1

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
