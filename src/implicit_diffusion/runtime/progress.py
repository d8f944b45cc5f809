"""A progress bar as a loop callback (tqdm, imported only when a bar is shown)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ProgressBar"]


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
