"""How many CPU threads an experiment's loop uses.

Small particle batches gain nothing from intra-op parallelism, and when another process holds
a core each parallel region waits for a scheduler time slice: on a 2-core machine with one
busy core, a 1,000-particle Langevin step ran 100× slower with 2 threads than with 1. The
experiments therefore use 1 thread for small batches, restoring the previous setting after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["AUTO_SINGLE_THREAD_BELOW", "torch_threads"]

AUTO_SINGLE_THREAD_BELOW = 20_000  # tensor elements per particle batch


@contextlib.contextmanager
def torch_threads(num_threads: int | None, batch_numel: int | None = None) -> Iterator[int]:
    """Set ``torch.set_num_threads`` for the block: ``num_threads`` if given, else (None: automatic)
    1 for batches under :data:`AUTO_SINGLE_THREAD_BELOW` elements and torch's setting otherwise
    (also when ``batch_numel`` is None: no automatic choice)."""
    previous = torch.get_num_threads()
    small = batch_numel is not None and batch_numel < AUTO_SINGLE_THREAD_BELOW
    if num_threads is not None and not (isinstance(num_threads, int) and num_threads >= 1):
        raise ValueError(f"num_threads must be None (automatic) or an integer >= 1, got {num_threads!r}")
    n = num_threads if num_threads is not None else (1 if small else previous)
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
