"""Memory a run needs, estimated before anything is allocated (or written), against what the device has.

Each experiment's config states its dominant allocations once, in ``Config.memory_estimate()``:
a ``dict`` from a description (naming the setting that drives it: "num_particles = 4,000,000,000
(particles of dimension 2 in float32 …)") to bytes. The
estimates are rough *lower bounds* (the tensors certainly alive at the same time, not the
allocator's overhead or every temporary), so a run they refuse cannot fit, and a run they let
through may still fail. :func:`check_config` compares their sum with :func:`available_bytes` of
the config's device and refuses, in one :class:`~implicit_diffusion.errors.ConfigError` line,
what cannot fit::

    num_particles = 4,000,000,000 needs about 640 GB of memory (particles of dimension 2 in float32: …);
    this machine has 24 GB available (cpu)

It runs in :func:`~implicit_diffusion.runtime.runner.execute` and ``resume`` before the run
directory is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["available_bytes", "check_config", "format_bytes", "require"]


def format_bytes(n: float) -> str:
    """``6.4e10`` → ``"64 GB"`` (decimal units, three significant digits; TB beyond)."""
    if n >= 1e15:
        return f"{n / 1e12:,.0f} TB"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo, lowered to what the cgroup (a container's limit) still allows."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
            return None
    try:  # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def available_bytes(device: Any = "cpu") -> int | None:
    """Bytes free on ``device`` (a ``torch.device`` or its name): the host's available memory for the
    CPU, ``torch.cuda.mem_get_info`` for a CUDA GPU; None where it cannot be told (MPS)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return _host_available()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def require(what: str, nbytes: int, device: Any = "cpu", *, total: int | None = None) -> None:
    """Refuse (ConfigError) when ``nbytes`` (or ``total``, the whole run's, when given) exceeds what
    ``device`` has available: "WHAT needs about N of memory; this machine has M available (DEVICE)"."""
    need = nbytes if total is None else total
    available = available_bytes(device)
    if available is None or need <= available:
        return
    in_all = f", about {format_bytes(total)} in all with the rest of the run" if total and total > 1.01 * nbytes else ""
    raise ConfigError(f"{what} needs about {format_bytes(nbytes)} of memory{in_all}; this machine has "
                      f"{format_bytes(available)} available ({device}): lower it")


def check_config(config: Any, device: Any = None, *, shards: int = 1) -> None:
    """Refuse a config whose ``memory_estimate()`` exceeds the memory of its device (``device``, else the
    one its ``device`` key resolves to, else the CPU). ``shards``: processes that split the work, each
    on its own GPU (torchrun), which divide a CUDA estimate. Configs without an estimate pass."""
    estimate = getattr(config, "memory_estimate", None)
    if estimate is None:
        return
    parts = {what: int(n) for what, n in estimate().items() if n > 0}
    if not parts:
        return
    if device is None:
        from ..devices import resolve_device

        device = resolve_device(config.device) if hasattr(config, "device") else "cpu"
    import torch

    split = shards if torch.device(device).type == "cuda" and shards > 1 else 1
    what = max(parts, key=parts.get)
    require(what, parts[what] // split, device, total=sum(parts.values()) // split)
