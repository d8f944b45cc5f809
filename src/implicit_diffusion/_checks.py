"""Checks on what user callables return, with errors that name the function.

A potential, reward or score model written by a user is called through :func:`call_user` and
its result checked by :func:`check_values` (one value per particle) or :func:`check_output`
(a tensor shaped like x): the error names the function and gives the expected and received
shape, dtype or device, at the first step, instead of a deep traceback from inside an
estimator. An exception raised inside the function becomes a :class:`UserFunctionError`
naming it (the original is chained as ``__cause__``, so its traceback is kept).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import NonFiniteError, UserFunctionError

__all__ = ["call_user", "callable_name", "check_output", "check_values"]


def callable_name(obj) -> str:
    """What an error message calls a user callable: its ``display_name``, ``__name__`` or type."""
    return getattr(obj, "display_name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def call_user(name: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``; an exception from inside becomes a :class:`UserFunctionError` naming ``name``."""
    try:
        return fn(*args)
    except (UserFunctionError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise UserFunctionError(f"{name} raised {type(e).__name__}: {e}") from e


def _check_finite(name: str, values: Tensor, what: str, allow_posinf: bool = False) -> None:
    if values.is_floating_point() or values.is_complex():
        bad = torch.isnan(values) | (values == -torch.inf) if allow_posinf else ~torch.isfinite(values)
        if bad.any():
            rows = bad.reshape(bad.shape[0], -1).any(1) if bad.ndim else bad.reshape(1)
            first = int(rows.nonzero()[0, 0]) if rows.any() else 0
            kind = "nan or -inf" if allow_posinf else "nan or inf"
            raise NonFiniteError(f"{name} returned non-finite values ({kind}) for {int(rows.sum())} of "
                             f"{rows.numel()} {what}, the first at index {first}")


def check_values(name: str, values, x: Tensor, *, finite: bool | str = True) -> Tensor:
    """Require ``values`` of shape ``(num_particles,)`` on x's device, in x's dtype if floating
    (bool or integer values, e.g. an indicator reward, are allowed), and finite (``finite=True``),
    free of NaN and −inf (``finite="allow +inf"``: energies where +inf is a hard constraint) or
    unchecked (``finite=False``); the error names the function."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor of shape ({x.shape[0]},), got {type(values).__name__}")
    if values.shape != x.shape[:1]:
        raise ValueError(
            f"{name} must return one value per particle, shape ({x.shape[0]},); got shape {tuple(values.shape)}"
        )
    if values.device != x.device:
        raise ValueError(f"{name} returned a tensor on {values.device}, particles are on {x.device}")
    if values.is_floating_point() and values.dtype != x.dtype:
        raise ValueError(f"{name} returned {values.dtype} values for {x.dtype} particles; expected {x.dtype}")
    if finite:
        _check_finite(name, values, "particles", allow_posinf=finite == "allow +inf")
    return values


def check_output(name: str, out, x: Tensor) -> Tensor:
    """Require a finite tensor of x's shape, dtype and device (a score model's prediction)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a tensor of x's shape {tuple(x.shape)}, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must return a tensor of x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if out.device != x.device:
        raise ValueError(f"{name} returned a tensor on {out.device}, x is on {x.device}")
    if out.dtype != x.dtype:
        raise ValueError(f"{name} returned {out.dtype}, x is {x.dtype}; expected {x.dtype}")
    _check_finite(name, out.detach(), "samples")
    return out
