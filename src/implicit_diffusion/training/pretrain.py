"""Pretraining a score model by denoising score matching, with an EMA of its weights.

Minimises :func:`~.dsm.dsm_loss` over minibatches of a data tensor with Adam, and keeps an
exponential moving average θ̄ ← decay·θ̄ + (1 − decay)·θ of the weights
(``torch.optim.swa_utils.AveragedModel``), the weights one samples with (Song & Ermon 2020;
Ho et al. 2020). Randomness (minibatches, times, noise) comes from the given generator.

:class:`DSMTrainer` holds the loop's state (Adam, EMA, losses so far) so that a run can be
checkpointed after any step and continued bit for bit (``state`` / ``load_state``, ``run(start=...)``);
:func:`pretrain_score_model` is the one-call form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..serialization import load_generator_state, load_optimizer_state, optimizer_state
from .dsm import dsm_loss

__all__ = ["DSMTrainer", "PretrainInfo", "pretrain_score_model"]


class PretrainInfo(NamedTuple):
    """What :func:`pretrain_score_model` returns: the EMA model and the per-step losses."""

    ema_model: AveragedModel
    losses: Tensor  # (num_steps,)


class DSMTrainer:
    """``num_steps`` Adam steps on the DSM loss of ``model`` (trained in place), with its EMA.

    Step k: a minibatch of ``batch_size`` rows of ``data`` ``(n, *event)`` drawn with replacement,
    the loss L(θ_k), a gradient step clipped to ``max_grad_norm``, then θ̄ ← decay·θ̄ + (1 − decay)·θ_{k+1}.
    Everything random comes from ``generator``.

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import ScoreMLP
        >>> from implicit_diffusion.samplers import VPSchedule
        >>> g = torch.Generator().manual_seed(0)
        >>> data, schedule = torch.randn(32, 2, generator=g), VPSchedule("linear", num_steps=5)
        >>> trainer = DSMTrainer(ScoreMLP(2, hidden=8), data, schedule, num_steps=3, generator=g, batch_size=4)
        >>> trainer.run().losses.shape
        torch.Size([3])
    """

    def __init__(self, model: torch.nn.Module, data: Tensor, schedule, *, num_steps: int,
                 generator: torch.Generator, batch_size: int = 256, lr: float = 1e-3, ema_decay: float = 0.999,
                 max_grad_norm: float | None = 1.0):
        if num_steps < 1 or batch_size < 1:
            raise ValueError(f"num_steps and batch_size must be >= 1, got {num_steps} and {batch_size}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (n, *event) with n > 0, got {tuple(data.shape)}")
        self.model, self.data, self.schedule = model, data, schedule
        self.num_steps, self.generator, self.batch_size = num_steps, generator, batch_size
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        self.losses = torch.empty(num_steps)

    def run(self, start: int = 0, callbacks: Iterable[Callable[[int, float], None]] = ()) -> PretrainInfo:
        """Steps ``start`` … ``num_steps − 1``; ``callbacks`` get ``(step, loss)`` after every update."""
        model, data, callbacks = self.model, self.data, tuple(callbacks)
        for k in range(start, self.num_steps):
            idx = torch.randint(data.shape[0], (self.batch_size,), generator=self.generator, device=data.device)
            loss = dsm_loss(model, data[idx], self.schedule, generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.ema.update_parameters(model)
            self.losses[k] = loss.detach()
            for cb in callbacks:
                cb(k, float(self.losses[k]))
        return PretrainInfo(self.ema, self.losses)

    def state(self, done: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)`` to continue after ``done`` steps: θ, θ̄, Adam, the generator, the losses so far."""
        t_o, m_o = optimizer_state(self.optimizer, "trainer.optimizer")
        tensors = {**{f"trainer.model.{k}": v for k, v in self.model.state_dict().items()},
                   **{f"trainer.ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **t_o, "trainer.generator": self.generator.get_state(),
                   "trainer.losses": self.losses[:done].clone()}
        return tensors, {"optimizer": m_o, "generator_device": self.generator.device.type}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> int:
        """Inverse of :meth:`state`; returns the number of steps done (the ``start`` to run from).
        Tensors land on the live objects' devices (a generator saved on another device type is
        re-seeded: serialization.load_generator_state)."""

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("trainer.model."))
        self.ema.load_state_dict(part("trainer.ema."))
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], "trainer.optimizer")
        load_generator_state(self.generator, tensors["trainer.generator"], meta.get("generator_device", "cpu"))
        done = tensors["trainer.losses"].shape[0]
        self.losses[:done] = tensors["trainer.losses"]
        return done


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
    trainer = DSMTrainer(model, data, schedule, num_steps=num_steps, generator=generator, batch_size=batch_size,
                         lr=lr, ema_decay=ema_decay, max_grad_norm=max_grad_norm)
    return trainer.run(0, callbacks)
