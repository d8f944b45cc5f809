"""Scale-out over processes with ``torch.distributed``: particles sharded, statistics global.

Under ``torchrun --nproc_per_node W -m implicit_diffusion run ...`` every process holds 1/W of
the particles. Estimators compute their statistics (the mean reward inside the covariance, the
particle count) over all processes through :func:`global_mean` / :func:`global_count`, each
process adds its particles' share of the surrogate gradient, and :func:`all_reduce_grads` sums
the shares, so every process applies the same Γ and θ stays identical everywhere. Only the
process of rank 0 writes files (:func:`is_main`).

Outside a process group every function here is the single-process identity (no cost, no
change in results). gloo is used on CPU and NCCL on GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "active",
    "agree",
    "all_gather_rows",
    "all_reduce_grads",
    "global_count",
    "global_mean",
    "init_from_env",
    "is_main",
    "rank",
    "world_size",
]


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when single-process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 when single-process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); returns
    whether one is active. Backend: NCCL when CUDA is available, gloo otherwise."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def global_count(n: int) -> int:
    """The total number of particles over all processes, given this process's ``n``."""
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def global_mean(values: Tensor, total: int | None = None) -> Tensor:
    """Mean of ``values`` ``(n,)`` over every process's values (``values.mean()`` alone when
    single-process). ``total``: the global count if already known."""
    if not active():
        return values.mean()
    s = values.sum().reshape(1)
    if total is None:
        s = torch.cat([s, torch.tensor([values.numel()], dtype=s.dtype, device=s.device)])
        dist.all_reduce(s)
        return s[0] / s[1]
    dist.all_reduce(s)
    return s[0] / total


def agree(ok: bool) -> bool:
    """True if ``ok`` holds on every process (a collective: all processes must call it)."""
    if not active():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def all_reduce_grads(params: Iterable[Tensor]) -> None:
    """Sum every parameter's ``.grad`` over the processes (each holds its particles' share of Γ)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def all_gather_rows(x: Tensor) -> Tensor:
    """Every process's rows of ``x`` ``(n_r, ...)``, concatenated in rank order (``x`` itself when
    single-process). The row counts may differ between processes."""
    if not active():
        return x
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64))
    rows = [int(c) for c in counts]
    padded = x.new_zeros((max(rows), *x.shape[1:]))  # gloo gathers equal shapes only
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])
