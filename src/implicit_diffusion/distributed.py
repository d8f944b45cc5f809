"""Scale-out over processes with ``torch.distributed``: particles sharded, statistics global.

Under ``torchrun --nproc_per_node W -m implicit_diffusion run ...`` every process holds 1/W of
the particles. Estimators compute their statistics (the mean reward inside the covariance, the
particle count) over all processes through :func:`global_mean` / :func:`global_count`, each
process adds its particles' share of the surrogate gradient, and :func:`all_reduce_grads` sums
the shares, so every process applies the same Γ and θ stays identical everywhere. Only the
process of rank 0 writes files (:func:`is_main`).

Outside a process group every function here is the single-process identity (no cost, no
change in results). On a machine with GPUs the group has both backends, ``cpu:gloo,cuda:nccl``:
each collective goes to the one for its tensors' device (NCCL takes CUDA tensors only), and each
process uses the GPU of its ``LOCAL_RANK`` (``torch.cuda.set_device``). Counts and flags are
reduced on the device of the data they describe; gradients in a few flat buckets, not one call
per parameter.
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
    whether one is active. Backend: gloo for CPU tensors, plus NCCL for CUDA tensors when there
    are GPUs (then this process's current GPU is ``cuda:LOCAL_RANK``)."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this machine")
        torch.cuda.set_device(local)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def global_count(n: int, device: torch.device | str = "cpu") -> int:
    """The total number of particles over all processes, given this process's ``n`` (reduced on
    ``device``: the particles', so a CUDA run needs no CPU collective)."""
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
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
    """True if ``ok`` holds on every process (a collective: all processes must call it; on the CPU
    backend, which every group has)."""
    if not active():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


BUCKET_NUMEL = 1 << 22  # 4M numbers (16 MiB in float32) per all-reduce call


def all_reduce_grads(params: Iterable[Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Sum every parameter's ``.grad`` over the processes (each holds its particles' share of Γ).

    The gradients are flattened into buckets of at most ``bucket_numel`` numbers (one per device
    and dtype, in parameter order), each all-reduced in one call and copied back: a network's
    hundreds of small tensors cost a few collectives, not one each. Every process must hold the
    same parameters with gradients (the order and shapes decide the buckets)."""
    if not active():
        return
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for g in [*grads, None]:
            if bucket and (g is None or size + g.numel() > bucket_numel):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(part.view_as(b))
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel()


def all_gather_rows(x: Tensor) -> Tensor:
    """Every process's rows of ``x`` ``(n_r, ...)``, concatenated in rank order (``x`` itself when
    single-process). The row counts may differ between processes."""
    if not active():
        return x
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    rows = [int(c) for c in counts]
    padded = x.new_zeros((max(rows), *x.shape[1:]))  # gloo gathers equal shapes only
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])
