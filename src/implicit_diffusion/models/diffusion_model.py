"""One object for a diffusion model: its network, what the network predicts, its schedule, its data shape.

:func:`implicit_diffusion.load_diffusion_model` (in :mod:`implicit_diffusion.pretrained.loading`) reads a
shipped model by name (``"digits"``, ``"photo-patches"``, ``"mnist5k"``), a ``model.safetensors`` written by
``implicit-diffusion pretrain``, or a local diffusers directory (``UNet2DModel`` + ``DDPMScheduler`` or
``DDIMScheduler``) into a :class:`DiffusionModel`. The samplers'
:func:`~implicit_diffusion.samplers.diffusion.sample`, :class:`~implicit_diffusion.objectives.GirsanovKL`
and the diffusion algorithms (:class:`~implicit_diffusion.algorithms.DiffusionQueue`,
:class:`~implicit_diffusion.algorithms.DiffusionNestedLoop`) take it in place of a bare network and read
the prediction type and the schedule from it, so neither ``prediction=`` nor ``to_score`` is repeated
(a different ``prediction=`` given with it is an error).

Example:
    >>> import torch
    >>> from implicit_diffusion import DiffusionModel, ScoreMLP, VPSchedule
    >>> model = DiffusionModel(ScoreMLP(2, prediction="epsilon"), "epsilon", VPSchedule("linear", num_steps=10), (2,))
    >>> model.score(torch.zeros(3, 2), torch.full((3,), 0.5)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..samplers.schedules import Prediction, VPSchedule, to_score

__all__ = ["DiffusionModel", "resolve_model"]

_PREDICTIONS = ("score", "epsilon", "x0")


@dataclasses.dataclass
class DiffusionModel:
    """A network with what it predicts, its VP schedule (and M-step sampling grid) and its sample shape.

    Attributes:
        net: ``net(x, t) -> (B, *data_shape)``, x ``(B, *data_shape)``, t ``(B,)`` forward-process
            times; its parameters are θ (give ``model.parameters()`` to the optimizer).
        prediction: what ``net`` outputs: ``"epsilon"`` (noise ε), ``"score"`` (∇log q_t) or ``"x0"``.
        schedule: the :class:`~implicit_diffusion.samplers.schedules.VPSchedule` and its sampling grid
            (``schedule.num_steps`` = M); :meth:`with_sampling_steps` changes M.
        data_shape: one sample's shape, e.g. ``(C, H, W)``.
        source: where it was loaded from (for messages).
        diffusers: the :class:`~.diffusers_adapter.LoadedDiffusers` record of a diffusers model (its
            scheduler and layout, to write it back with ``save_diffusers``), else ``None``.
    """

    net: nn.Module
    prediction: Prediction
    schedule: VPSchedule
    data_shape: tuple[int, ...]
    source: str = ""
    diffusers: object | None = None

    def __post_init__(self):
        if self.prediction not in _PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(map(repr, _PREDICTIONS))}, "
                             f"got {self.prediction!r}")
        self.data_shape = tuple(int(d) for d in self.data_shape)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s_θ(x, t) = ∇ₓ log q_t(x) whatever ``prediction`` is (ε: −ε̂/σ(t); x₀: −(x − √ᾱ x̂₀)/σ²).

        ``x``: ``(B, *data_shape)``; ``t``: ``(B,)``. Differentiable in x and θ."""
        return to_score(self.net(x, t), x, t, self.schedule, self.prediction)

    def score_fn(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``to_score(output, x, t)``: the network's ``output`` at (x, t) as a score (GirsanovKL's ``to_score``)."""
        return to_score(output, x, t, self.schedule, self.prediction)

    def parameters(self, recurse: bool = True):
        """θ: the network's parameters."""
        return self.net.parameters(recurse)

    def with_sampling_steps(self, num_sampling_steps: int) -> DiffusionModel:
        """The same network and schedule on an M = ``num_sampling_steps`` grid (a new object)."""
        if not (isinstance(num_sampling_steps, int) and num_sampling_steps >= 1):
            raise ValueError(f"num_sampling_steps must be an integer >= 1, got {num_sampling_steps!r}")
        return dataclasses.replace(self, schedule=dataclasses.replace(self.schedule, num_steps=num_sampling_steps))

    def to(self, device=None, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move the network (in place) to ``device`` / ``dtype``; returns ``self``."""
        self.net.to(device=device, dtype=dtype)
        return self

    def init_fn(self, batch_size: int) -> Callable[[torch.Generator], Tensor]:
        """``init_fn(generator) -> (batch_size, *data_shape)`` N(0, I) draws on the network's device and
        dtype: the start p₀ the diffusion algorithms take as ``init_fn=``."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        first = next(self.net.parameters(), None)
        device, dtype = (first.device, first.dtype) if first is not None else (None, None)
        return lambda generator: torch.randn((batch_size, *self.data_shape), generator=generator, device=device,
                                             dtype=dtype)

    def save(self, path, *, extra: dict | None = None) -> None:
        """Write the model where :func:`~implicit_diffusion.load_diffusion_model` reads it back: a diffusers model
        as a diffusers directory ``path`` in its source's layout (``DDPMPipeline.from_pretrained`` /
        ``UNet2DModel.from_pretrained`` load it; the scheduler unchanged), any other as a model file ``path``
        (``.safetensors``; its schedule and data shape recorded, with ``extra`` in its metadata).
        A LoRA-adapted network (:func:`~implicit_diffusion.models.lora.add_lora`) is written with its adapters
        merged."""
        from .lora import has_lora, merge_lora

        net = merge_lora(copy.deepcopy(self.net)) if has_lora(self.net) else self.net
        if self.diffusers is not None:
            from .diffusers_adapter import save_diffusers

            if extra:
                raise ValueError("extra= is recorded in model files only; a diffusers directory has no place for it")

            save_diffusers(self.diffusers, net, self.diffusers.directory, path)
            return
        from .io import save_score_model

        save_score_model(path, net, self.schedule, extra={**(extra or {}), "data_shape": list(self.data_shape)})

    def sample(self, n: int, *, step=None, generator: torch.Generator) -> Tensor:
        """``n`` samples x_M ``(n, *data_shape)`` of the M-step sampler ``step`` (default: DDPM ancestral),
        from N(0, I), without a graph."""
        from ..samplers.diffusion import ddpm_step, sample

        with torch.no_grad():
            return sample(step or ddpm_step, self, self.init_fn(n)(generator), generator=generator)


def resolve_model(model, schedule=None, prediction: str | None = None, *, default_prediction: str = "score"):
    """``(net, schedule, prediction)`` of ``model``, a :class:`DiffusionModel` or a bare network.

    For a :class:`DiffusionModel`, ``schedule`` ``None`` means its own and ``prediction`` ``None`` its own; a
    different ``prediction`` is a ``ValueError``. For a bare network, ``prediction`` ``None`` is
    ``default_prediction``."""
    if isinstance(model, DiffusionModel):
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the DiffusionModel's prediction "
                             f"{model.prediction!r}; leave prediction out (it is read from the model)")
        return model.net, model.schedule if schedule is None else schedule, model.prediction
    return model, schedule, default_prediction if prediction is None else prediction
