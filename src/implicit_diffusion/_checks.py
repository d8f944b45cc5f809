"""Checks on what user callables return, with errors that name the function."""

from __future__ import annotations

from torch import Tensor

__all__ = ["callable_name", "check_values"]


def callable_name(obj) -> str:
    """What an error message calls a user callable: its ``display_name``, ``__name__`` or type."""
    return getattr(obj, "display_name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def check_values(name: str, values, x: Tensor) -> Tensor:
    """Require ``values`` of shape ``(num_particles,)`` on x's device, naming the function if not."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor of shape ({x.shape[0]},), got {type(values).__name__}")
    if values.shape != x.shape[:1]:
        raise ValueError(
            f"{name} must return one value per particle, shape ({x.shape[0]},); got shape {tuple(values.shape)}"
        )
    if values.device != x.device:
        raise ValueError(f"{name} returned a tensor on {values.device}, particles are on {x.device}")
    return values

