"""diffusers models (optional): a local ``UNet2DModel`` + DDPM/DDIM scheduler directory as a model here.

A diffusers DDPM has N training timesteps i = 0 … N−1 with ᾱ_i = ``scheduler.alphas_cumprod[i]``
(Ho et al. 2020). It becomes the ``VPSchedule("discrete", alphas_cumprod=(ᾱ_0, …, ᾱ_{N−1}))`` on
[0, 1] (see :mod:`implicit_diffusion.samplers.schedules`): timestep i sits at t_i = (i + 1)/N, ᾱ(t_i)
is the scheduler's own ᾱ_i (read from the scheduler, so any ``beta_schedule`` or ``trained_betas``
maps exactly), log ᾱ is linear in t between grid points, ᾱ(0) = 1 and t_min = 0. The M sampling
times are the grid points of the indices diffusers' ``set_timesteps(M)`` picks (the scheduler's
``timestep_spacing`` and ``steps_offset``), then t = 0, for any M ≤ N (also after
``dataclasses.replace(schedule, num_steps=M)``). So the library's ``ddpm_step`` and ``ddim_step``
are ``DDPMScheduler.step`` and ``DDIMScheduler.step`` (η = 0) given the same noise, to rounding
(``tests/test_diffusers.py``: 1e-12 in float64), except that diffusers clips x̂₀ to [−1, 1] by
default (``clip_sample``) and these steps never do, DDPM's variance here is ``"fixed_small"``, and a
DDIM with ``set_alpha_to_one=False`` ends on ᾱ_0 where this schedule ends on ᾱ = 1. A step here
always goes to the next picked index (``DDPMScheduler``'s rule); ``DDIMScheduler`` goes to
i − ⌊N/M⌋, the same index for ``"leading"`` spacing (its default) and for ``"trailing"`` when M
divides N.

The network is called at the discrete timestep index i = t·N − 1 (an integer on the grid; a float in
between: the sinusoidal time embedding of UNet2DModel accepts non-integer timesteps). Predictions
``"epsilon"`` and ``"sample"`` (x₀) convert to the score through
:mod:`implicit_diffusion.samplers.schedules`; ``"v_prediction"`` is refused. Weights are read only
from safetensors (``use_safetensors=True``), never from pickled ``.bin`` files, and nothing is
downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import DataError
from ..samplers.schedules import VPSchedule
from .diffusers_config import check_scheduler_config, check_unet_config, check_unet_weights, read_json

__all__ = ["DiffusersUNet", "LoadedDiffusers", "load_diffusers", "save_diffusers"]

_PREDICTIONS = {"epsilon": "epsilon", "sample": "x0"}
_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


class DiffusersUNet(nn.Module):
    """``model(x, t)`` over a diffusers ``UNet2DModel``: timestep index t·N − 1, output as predicted.

    Attributes: ``unet`` (the diffusers module, whose parameters are θ), ``num_train_timesteps``
    N, ``prediction`` (``"epsilon"`` or ``"x0"``, the library's names).
    """

    def __init__(self, unet: nn.Module, num_train_timesteps: int, prediction: str):
        super().__init__()
        self.unet = unet
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction = prediction

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        index = t * self.num_train_timesteps - 1
        # On the grid t = (i + 1)/N the index is the integer i that diffusers calls the UNet with; in
        # float32 t·N misses it by up to ~6e-8·N, which the sinusoidal embedding would see. Off the
        # grid (uniform spacing) the index stays fractional.
        nearest = index.round()
        index = torch.where((index - nearest).abs() < 1e-3, nearest, index)
        return self.unet(x, index.clamp(min=0)).sample


class LoadedDiffusers(NamedTuple):
    model: DiffusersUNet
    schedule: VPSchedule
    shape: tuple[int, ...]  # one sample, (C, H, W)
    scheduler: object  # the diffusers scheduler (written back unchanged)
    layout: str  # "pipeline" (model_index.json, unet/, scheduler/) or "flat" (config.json + scheduler_config.json)
    directory: str = ""  # where it was read from (its model_index.json is copied when written back)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DataError("--diffusers-model needs the optional dependency diffusers: "
                        "pip install 'implicit-diffusion[diffusers]'") from None
    return diffusers


def vp_schedule_for(scheduler, num_steps: int | None = None) -> VPSchedule:
    """The ``"discrete"`` VP schedule of a diffusers DDPM/DDIM scheduler (see the module docstring).

    ``scheduler``: a ``DDPMScheduler``/``DDIMScheduler``, or its config (a dict, as in
    ``scheduler_config.json``; the scheduler is then built from it). ``num_steps``: M sampling steps,
    M ≤ N; ``None`` means min(100, ⌊N/2⌋). Raises :class:`DataError` for an ᾱ table that is not strictly
    decreasing in (0, 1) (e.g. ``rescale_betas_zero_snr``, whose ᾱ_{N−1} = 0 has no score).
    """
    if isinstance(scheduler, dict):
        diffusers = _require_diffusers()
        name = scheduler.get("_class_name", "DDPMScheduler")
        scheduler = getattr(diffusers, name if name in _SCHEDULERS else "DDPMScheduler").from_config(scheduler)
    config = scheduler.config
    # float32 in diffusers; its values as Python floats (exact in float64) are the table.
    table = scheduler.alphas_cumprod.tolist()
    spacing = config.get("timestep_spacing", "leading")
    offset = int(config.get("steps_offset", 0)) if spacing == "leading" else 0  # diffusers ignores it otherwise
    try:
        # The default M keeps ⌊N/M⌋ ≥ 2, so a "leading" steps_offset of 1 stays on the table.
        default = max(1, min(100, len(table) // 2))
        return VPSchedule("discrete", num_steps=default if num_steps is None else num_steps,
                          alphas_cumprod=table, spacing=spacing, steps_offset=offset)
    except ValueError as e:
        raise DataError(f"cannot use this {type(scheduler).__name__} ({len(table)} training steps): {e}") from None


def load_diffusers(path: str | Path, num_steps: int | None = None) -> LoadedDiffusers:
    """Read a directory written by ``DDPMPipeline.save_pretrained`` (``unet/``, ``scheduler/``) or by
    ``UNet2DModel.save_pretrained`` plus a scheduler's ``save_pretrained`` into the same directory.
    One-line :class:`DataError` for anything else."""
    diffusers = _require_diffusers()
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"diffusers model directory {str(path)!r} does not exist")
    if (path / "unet" / "config.json").is_file():
        layout, unet_dir, sched_dir = "pipeline", path / "unet", path / "scheduler"
    elif (path / "config.json").is_file():
        layout, unet_dir, sched_dir = "flat", path, path
    else:
        raise DataError(f"{str(path)!r} holds no diffusers UNet (expected unet/config.json or config.json)")
    sched_file = sched_dir / "scheduler_config.json"
    if not sched_file.is_file():
        raise DataError(f"{str(path)!r} has no scheduler_config.json beside its UNet "
                        f"(expected {str(sched_file)!r}, as written by the scheduler's save_pretrained)")
    # every key used below is checked before diffusers builds anything from these files (diffusers_config)
    unet_config = read_json(unet_dir / "config.json")
    shape = check_unet_config(unet_config, unet_dir / "config.json")
    sched_config = read_json(sched_file)
    cls_name = check_scheduler_config(sched_config, sched_file, _SCHEDULERS, tuple(_PREDICTIONS))
    prediction = sched_config.get("prediction_type", "epsilon")
    check_unet_weights(unet_config, unet_dir)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                                     low_cpu_mem_usage=False)
        scheduler = getattr(diffusers, cls_name).from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the diffusers model in {str(path)!r} (only safetensors weights are read): "
                        f"{' '.join(str(e).split())[:300]}") from None
    model = DiffusersUNet(unet, scheduler.config.num_train_timesteps, _PREDICTIONS[prediction])
    return LoadedDiffusers(model, vp_schedule_for(scheduler, num_steps), shape, scheduler, layout, str(path))


def save_diffusers(loaded: LoadedDiffusers, model: DiffusersUNet, source: str | Path, out: str | Path) -> None:
    """Write ``model``'s UNet (safetensors) and the unchanged scheduler to ``out`` in the source's
    layout, so ``DDPMPipeline.from_pretrained(out)`` (or ``UNet2DModel.from_pretrained``) loads it."""
    out = Path(out)
    if loaded.layout == "pipeline":
        model.unet.save_pretrained(out / "unet", safe_serialization=True)
        loaded.scheduler.save_pretrained(out / "scheduler")
        index = Path(source) / "model_index.json"
        if index.is_file():
            shutil.copyfile(index, out / "model_index.json")
    else:
        model.unet.save_pretrained(out, safe_serialization=True)
        loaded.scheduler.save_pretrained(out)
