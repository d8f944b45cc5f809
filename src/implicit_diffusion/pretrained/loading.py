"""Load a diffusion model from a name, a model file or a diffusers directory: :func:`load_diffusion_model`.

It lives here, beside the shipped models it reads (``models`` may not import ``pretrained``); it is
exported as ``implicit_diffusion.load_diffusion_model``.

Example:
    >>> from implicit_diffusion import load_diffusion_model
    >>> model = load_diffusion_model("digits", num_sampling_steps=10)
    >>> model.prediction, model.data_shape, model.schedule.num_steps
    ('epsilon', (1, 8, 8), 10)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from ..models.diffusion_model import _PREDICTIONS, DiffusionModel

__all__ = ["load_diffusion_model"]


def load_diffusion_model(source: str | Path, *, num_sampling_steps: int | None = None,
                         device: str | torch.device | None = None) -> DiffusionModel:
    """Load a diffusion model as one :class:`DiffusionModel`, in eval mode.

    Args:
        source: a shipped model's name (``"digits"``, ``"photo-patches"``, ``"mnist5k"``), a model file
            written by ``implicit-diffusion pretrain`` (or ``models.io.save_score_model``), or a local diffusers
            directory (``UNet2DModel`` + DDPM/DDIM scheduler, ``models.diffusers_adapter.load_diffusers``).
            Nothing is downloaded.
        num_sampling_steps: M, the number of sampling steps (the schedule's grid); ``None``: the file's.
        device: where to put the network (``None``: the CPU).

    Raises :class:`~implicit_diffusion.errors.DataError` (one line) for a missing or unreadable source.
    """
    from ..models.io import load_score_model
    from . import PRETRAINED, load_pretrained

    path = Path(source)
    diffusers = None
    if str(source) in PRETRAINED and not path.exists():
        loaded, label = load_pretrained(str(source)), f"shipped '{source}' model"
    elif path.is_dir():
        from ..models.diffusers_adapter import load_diffusers

        diffusers = load_diffusers(path)
        net, schedule, shape, label = diffusers.model, diffusers.schedule, diffusers.shape, f"diffusers model {path}"
    elif path.is_file():
        loaded, label = load_score_model(path), str(path)
    elif path.suffix or len(path.parts) > 1:  # meant as a path
        raise DataError(f"no such model file or diffusers directory: {str(source)!r} (a model file from "
                        f"`implicit-diffusion pretrain`, a diffusers model directory, or a shipped model's name: "
                        f"{', '.join(PRETRAINED)})")
    else:
        raise DataError(f"no diffusion model {str(source)!r}: expected a shipped model's name "
                        f"({', '.join(PRETRAINED)}), a model file from `implicit-diffusion pretrain` or a "
                        f"diffusers model directory")
    if diffusers is None:
        net, schedule = loaded.model, loaded.schedule
        shape = loaded.extra.get("data_shape") or getattr(net, "config", {}).get("dim")
        shape = [shape] if isinstance(shape, int) else shape
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise DataError(f"{label}: the file does not record its data shape (extra['data_shape']); "
                            f"save it with `implicit-diffusion pretrain`")
    prediction = getattr(net, "prediction", None)
    if prediction not in _PREDICTIONS:
        raise DataError(f"{label}: unknown prediction type {prediction!r}")
    model = DiffusionModel(net.train(False), prediction, schedule, tuple(shape), label, diffusers)
    if device is not None:
        model.to(device)
    return model if num_sampling_steps is None else model.with_sampling_steps(num_sampling_steps)
