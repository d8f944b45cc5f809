"""Small score models shipped with the package (safetensors), each reproducible by one command.

==================  ===========================  ==============================================
name                data                         reproduce
==================  ===========================  ==============================================
``digits``          scikit-learn's 8×8 digits    ``implicit-diffusion pretrain digits``
``photo-patches``   8×8 colour patches of        ``implicit-diffusion pretrain photo-patches``
                    scikit-learn's sample photos
``mnist5k``         5,000 real 28×28 MNIST       ``implicit-diffusion pretrain mnist5k``
                    digits (the ``mnist`` extra)
==================  ===========================  ==============================================

All are :class:`~implicit_diffusion.models.unet.UNet` ε-predictors on the ``"linear"`` VP
schedule, trained with the ``pretrain`` defaults and seed 0 (the exact command is also stored in
each file's metadata, ``extra["reproduce"]``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

__all__ = ["PRETRAINED", "pretrained_path", "load_pretrained"]

PRETRAINED = ("digits", "photo-patches", "mnist5k")


def pretrained_path(name: str) -> Path:
    """Path of the shipped model ``name``."""
    if name not in PRETRAINED:
        raise DataError(f"no shipped model {name!r}; available: {', '.join(PRETRAINED)}")
    path = Path(__file__).with_name(f"{name}.safetensors")
    if not path.is_file():
        raise DataError(f"the shipped model file {path} is missing from this installation; "
                        f"recreate it with: implicit-diffusion pretrain {name}")
    return path


def load_pretrained(name: str, *, device="cpu"):
    """The shipped model ``name`` as a :class:`~implicit_diffusion.models.io.ScoreModelFile`."""
    from ..models.io import load_score_model

    return load_score_model(pretrained_path(name), device=device)
