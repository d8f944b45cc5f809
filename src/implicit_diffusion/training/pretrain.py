"""Pretraining a score model by denoising score matching, with an EMA of its weights.

Minimises :func:`~.dsm.dsm_loss` over minibatches of a data tensor with Adam, and keeps an
exponential moving average θ̄ ← decay·θ̄ + (1 − decay)·θ of the weights
(``torch.optim.swa_utils.AveragedModel``), the weights one samples with (Song & Ermon 2020;
Ho et al. 2020). Randomness (minibatches, times, noise) comes from the given generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .dsm import dsm_loss

__all__ = ["PretrainInfo", "pretrain_score_model"]


class PretrainInfo(NamedTuple):
    """What :func:`pretrain_score_model` returns: the EMA model and the per-step losses."""

    ema_model: AveragedModel
    losses: Tensor  # (num_steps,)


def pretrain_score_model(
    model: torch.nn.Module,
    data: Tensor,
    schedule,
    *,
    num_steps: int,
    generator: torch.Generator,
    batch_size: int = 256,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    max_grad_norm: float | None = 1.0,
    callbacks: Iterable[Callable[[int, float], None]] = (),
) -> PretrainInfo:
    """Train ``model`` (in place) on ``data`` ``(n, *event)``; return its EMA copy and the losses.

    ``callbacks`` get ``(step, loss)`` after every update (a progress bar, a logger).
    """
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps and batch_size must be >= 1, got {num_steps} and {batch_size}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (n, *event) with n > 0, got {tuple(data.shape)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    losses = torch.empty(num_steps)
    callbacks = tuple(callbacks)
    for k in range(num_steps):
        idx = torch.randint(data.shape[0], (batch_size,), generator=generator, device=data.device)
        loss = dsm_loss(model, data[idx], schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        ema.update_parameters(model)
        losses[k] = loss.detach()
        for cb in callbacks:
            cb(k, float(losses[k]))
    return PretrainInfo(ema, losses)
