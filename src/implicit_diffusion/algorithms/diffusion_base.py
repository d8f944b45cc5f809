"""What the finite-horizon (diffusion) algorithms share: their ingredients, the θ update, the run loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .. import distributed
from ..models.diffusion_model import DiffusionModel, resolve_model
from ..samplers.diffusion import DiffusionStep
from ..samplers.schedules import Prediction, VPSchedule
from ..serialization import load_optimizer_state, optimizer_state
from .base import Callback, run_steps

__all__ = ["DiffusionAlgorithm"]


class DiffusionAlgorithm:
    """Base of :class:`~.queue.DiffusionQueue` and :class:`~.diffusion_nested.DiffusionNestedLoop`.

    Args:
        model: a :class:`~implicit_diffusion.models.diffusion_model.DiffusionModel` (from
            :func:`~implicit_diffusion.load_diffusion_model`: its network, schedule and prediction type are
            used), or a bare network ``model(x, t)``; its parameters are θ.
        step: a diffusion step ``step(x, model, m, *, schedule, generator, noise, prediction)``.
        schedule: the discretisation (``schedule.times`` has M + 1 entries); default: the DiffusionModel's.
            With a DiffusionModel the optimizer may come third: ``DiffusionQueue(model, ddpm_step, optimizer, ...)``.
        optimizer: any ``torch.optim`` optimizer over θ.
        init_fn: ``init_fn(generator) -> (batch, *event)`` draws p₀ (e.g. N(0, I)).
        reward_fn: ``R(x) -> (batch,)``, differentiable in x; the loss is −λ·mean R(x_M).
        reward_weight: λ.
        running_cost: optional ``c(x, m) -> scalar`` added at every step (e.g.
            objectives.GirsanovKL for β·KL(path_θ‖path_θ₀)). If it has a method
            ``per_sample(x, m) -> (batch,)`` taking per-particle step indices, the queue calls
            that once per iteration for all its batches instead of once per batch; if it is marked
            ``reuses_model_output`` (GirsanovKL is), each adjoint step hands it the sampler step's
            own network output (``model_call=``), so the network runs once for both.
        prediction: what the model outputs (``"score"``, ``"epsilon"``, ``"x0"``); default: the
            DiffusionModel's, or ``"score"`` for a bare network. A DiffusionModel and a different
            ``prediction`` is a ``ValueError``.
        max_grad_norm: optional gradient clipping before each optimizer step.
    """

    def __init__(
        self,
        model: torch.nn.Module | DiffusionModel,
        step: DiffusionStep,
        schedule: VPSchedule | torch.optim.Optimizer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        init_fn: Callable[[torch.Generator], Tensor],
        reward_fn: Callable[[Tensor], Tensor],
        reward_weight: float = 1.0,
        running_cost: Callable[[Tensor, int], Tensor] | None = None,
        prediction: Prediction | None = None,
        max_grad_norm: float | None = None,
    ):
        if isinstance(schedule, torch.optim.Optimizer):  # (model, step, optimizer): the model's own schedule
            if optimizer is not None:
                raise TypeError("schedule is an optimizer and optimizer is given too: pass (model, step, schedule, "
                                "optimizer) or, with a DiffusionModel, (model, step, optimizer)")
            schedule, optimizer = None, schedule
        if optimizer is None:
            raise TypeError("an optimizer is required, e.g. torch.optim.Adam(model.parameters(), lr=1e-4)")
        model, schedule, prediction = resolve_model(model, schedule, prediction)
        if schedule is None:
            raise TypeError("schedule is required for a bare network (or pass a DiffusionModel, which carries it)")
        self.model = model
        self.step_fn = step
        self.schedule = schedule
        self.optimizer = optimizer
        self.init_fn = init_fn
        self.reward_fn = reward_fn
        self.reward_weight = float(reward_weight)
        self.running_cost = running_cost
        self.prediction = prediction
        self.max_grad_norm = max_grad_norm
        self.num_sampling_steps = len(schedule.times) - 1
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _update(self) -> None:
        """Clip (if asked) and take the optimizer step, when some gradient has arrived.

        With the batches sharded over processes (torchrun), each process's gradient is the mean
        over its share; the mean of the W equal-sized shares' gradients is the whole batch's, so
        the gradients are all-reduced and divided by W before clipping."""
        if any(p.grad is not None for p in self.params):
            if distributed.active():
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_grads(self.params)
                for p in self.params:
                    p.grad.div_(distributed.world_size())
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()

    def state(self, prefix: str = "algo") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint: θ (the model's parameters and buffers, ``{prefix}.model.*``) and the
        optimizer's state (``{prefix}.optimizer.*``) as tensors, the rest as JSON. Subclasses add
        what they carry between iterations. The caller keeps the generator's state."""
        tensors = {f"{prefix}.model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        t_o, m_o = optimizer_state(self.optimizer, prefix=f"{prefix}.optimizer")
        return {**tensors, **{k: v.clone() for k, v in t_o.items()}}, {"optimizer": m_o}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "algo") -> None:
        """Inverse of :meth:`state`: continue bit for bit from the saved iteration."""
        head = f"{prefix}.model."
        self.model.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"], prefix=f"{prefix}.optimizer")

    def step(self, k: int, *, generator: torch.Generator) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, num_steps: int, *, generator: torch.Generator, start: int = 0,
            callbacks: Iterable[Callback] = ()) -> None:
        """Run ``num_steps`` iterations; callbacks get ``(k, None, stats)`` (no particles to carry; the
        stats keys: see :class:`~.base.Callback`)."""
        run_steps(lambda _x, k: (None, self.step(k, generator=generator)), None, num_steps, start=start,
                  callbacks=callbacks)
