"""diffusers models (optional): a local ``UNet2DModel`` + DDPM/DDIM scheduler directory as a model here.

A diffusers DDPM is a discretisation of a continuous variance-preserving SDE (Song et al. 2021,
ICLR, appendix B): N training timesteps with β_i (i = 0 … N−1) correspond to the VP schedule with
β(t) = N·β_discrete at t = (i + 1)/N on [0, 1], so that ᾱ_i ≈ ᾱ(t_i) = exp(−∫₀^{t_i} β). Hence

- ``beta_schedule = "linear"`` (β from β_start to β_end) ↦ ``VPSchedule("linear", beta_min = N·β_start,
  beta_max = N·β_end, T = 1, t_min = 1/N)``;
- ``"squaredcos_cap_v2"`` ↦ ``VPSchedule("cosine", T = 1, t_min = 1/N)`` with β capped at
  −N·log(1 − 0.999), the continuous form of diffusers' cap of 0.999 on each discrete β;

and the network is called at the discrete timestep index i = t·N − 1 (a float: the sinusoidal time
embedding of UNet2DModel accepts non-integer timesteps). Predictions ``"epsilon"`` and ``"sample"``
(x₀) convert to the score through :mod:`implicit_diffusion.samplers.schedules`; ``"v_prediction"``
is refused. Weights are read only from safetensors (``use_safetensors=True``), never from pickled
``.bin`` files, and nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from ..errors import DataError
from ..samplers.schedules import VPSchedule

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
        timestep = (t * self.num_train_timesteps - 1).clamp(min=0)
        return self.unet(x, timestep).sample


class LoadedDiffusers(NamedTuple):
    model: DiffusersUNet
    schedule: VPSchedule
    shape: tuple[int, ...]  # one sample, (C, H, W)
    scheduler: object  # the diffusers scheduler (written back unchanged)
    layout: str  # "pipeline" (model_index.json, unet/, scheduler/) or "flat" (config.json + scheduler_config.json)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DataError("--diffusers-model needs the optional dependency diffusers: "
                        "pip install 'implicit-diffusion[diffusers]'") from None
    return diffusers


def vp_schedule_for(scheduler_config: dict, num_steps: int = 100) -> VPSchedule:
    """The continuous VP schedule a diffusers DDPM/DDIM scheduler config discretises (module doc)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        raise DataError("schedulers with explicit trained_betas are not supported; allowed beta_schedule: "
                        "'linear', 'squaredcos_cap_v2'")
    if kind == "linear":
        return VPSchedule("linear", num_steps=num_steps, T=1.0, t_min=1.0 / n,
                          beta_min=float(scheduler_config.get("beta_start", 1e-4)) * n,
                          beta_max=float(scheduler_config.get("beta_end", 0.02)) * n)
    if kind == "squaredcos_cap_v2":  # diffusers caps each discrete β at 0.999: β(t) ≤ −N·log(1 − 0.999)
        return VPSchedule("cosine", num_steps=num_steps, T=1.0, t_min=1.0 / n, beta_max=-n * math.log1p(-0.999))
    raise DataError(f"unsupported beta_schedule {kind!r}; allowed: 'linear', 'squaredcos_cap_v2'")


def load_diffusers(path: str | Path, num_steps: int = 100) -> LoadedDiffusers:
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
        raise DataError(f"{str(path)!r} has no scheduler_config.json beside its UNet")
    try:
        sched_config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(sched_file)!r} is not valid JSON: {e}") from None
    cls_name = sched_config.get("_class_name")
    if cls_name not in _SCHEDULERS:
        raise DataError(f"scheduler {cls_name!r} in {str(sched_file)!r} is not supported; allowed: "
                        f"{', '.join(_SCHEDULERS)}")
    prediction = sched_config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise DataError(f"prediction_type {prediction!r} is not supported; allowed: {', '.join(_PREDICTIONS)}")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                                     low_cpu_mem_usage=False)
        scheduler = getattr(diffusers, cls_name).from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the diffusers model in {str(path)!r} (only safetensors weights are read): "
                        f"{' '.join(str(e).split())[:300]}") from None
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    h, w = (size, size) if isinstance(size, int) else size
    model = DiffusersUNet(unet, sched_config.get("num_train_timesteps", 1000), _PREDICTIONS[prediction])
    return LoadedDiffusers(model, vp_schedule_for(sched_config, num_steps), (cfg.in_channels, h, w), scheduler,
                           layout)


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
