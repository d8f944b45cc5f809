"""Saving and loading score models as safetensors: weights plus a JSON description, no pickle.

A file holds the model's ``state_dict`` and string metadata:

- ``format``: ``"implicit-diffusion/score-model"``, ``version``: ``"1"``;
- ``class``: ``"ScoreMLP"`` or ``"UNet"``; ``config``: JSON of the constructor arguments
  (the model's ``config`` attribute), so ``CLASS(**config)`` rebuilds the architecture;
- ``schedule``: JSON of the :class:`~implicit_diffusion.samplers.schedules.VPSchedule` the model
  was trained with (its noise levels define what the network's time input means);
- ``extra``: free JSON (data set, training settings, how to reproduce the file).

Loading checks all of these and raises :class:`~implicit_diffusion.errors.DataError` with a
one-line reason for an absent, truncated or foreign file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import DataError
from ..serialization import save_tensors

__all__ = ["FORMAT", "ScoreModelFile", "save_score_model", "load_score_model", "model_classes"]

FORMAT = "implicit-diffusion/score-model"
_VERSION = "1"


def model_classes() -> dict[str, type[torch.nn.Module]]:
    """Classes a file may name (imported here, not at module import, to keep imports light)."""
    from .score_nets import ScoreMLP
    from .unet import UNet

    return {"ScoreMLP": ScoreMLP, "UNet": UNet}


class ScoreModelFile(NamedTuple):
    """What :func:`load_score_model` returns."""

    model: torch.nn.Module
    schedule: Any  # VPSchedule
    extra: dict


def save_score_model(path: str | Path, model: torch.nn.Module, schedule, *, extra: dict | None = None) -> None:
    """Write ``model`` (its class must be one of :func:`model_classes`) and its schedule, atomically."""
    name = type(model).__name__
    if name not in model_classes() or not hasattr(model, "config"):
        raise TypeError(f"can save {', '.join(model_classes())} models only, got {name}")
    metadata = {
        "format": FORMAT,
        "version": _VERSION,
        "class": name,
        "config": json.dumps(model.config),
        "schedule": json.dumps(dataclasses.asdict(schedule)),
        "extra": json.dumps(extra or {}),
    }
    save_tensors(path, model.state_dict(), metadata)


def load_score_model(path: str | Path, *, device: str | torch.device = "cpu") -> ScoreModelFile:
    """Rebuild the model saved at ``path`` (in eval mode) with its schedule and extra metadata."""
    from safetensors import SafetensorError, safe_open

    from ..samplers.schedules import VPSchedule

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such model file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an implicit-diffusion score model (metadata format={meta.get('format')!r})")
    if meta.get("version") != _VERSION:
        raise DataError(f"{path}: unsupported score-model file version {meta.get('version')!r}; allowed: {_VERSION}")
    classes = model_classes()
    if meta.get("class") not in classes:
        raise DataError(f"{path}: unknown model class {meta.get('class')!r}; allowed: {', '.join(classes)}")
    try:
        config, schedule, extra = (json.loads(meta[k]) for k in ("config", "schedule", "extra"))
        model = classes[meta["class"]](**config)
        schedule = VPSchedule(**schedule)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed model description ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{path}: weights do not match the {meta['class']} it describes ({first})") from e
    return ScoreModelFile(model.to(device).eval(), schedule, extra)
