"""The project's own exception types: what the CLI turns into one-line errors (exit code 2)."""

from __future__ import annotations

__all__ = [
    "ImplicitDiffusionError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "NonFiniteError",
    "RunDirError",
    "UserFunctionError",
]


class ImplicitDiffusionError(Exception):
    """Base class of the errors this package raises on bad input."""


class ConfigError(ImplicitDiffusionError, ValueError):
    """An unknown configuration key, or a value of the wrong type or outside the allowed set."""


class RunDirError(ImplicitDiffusionError, OSError):
    """The output directory cannot be used (exists and is not empty, or is not writable)."""


class DataError(ImplicitDiffusionError, ValueError):
    """A data or model file that is absent, of an unknown format, malformed, or refused (pickles
    without an explicit opt-in)."""


class UserFunctionError(ImplicitDiffusionError, RuntimeError):
    """A user's potential, reward or model raised an exception (chained as ``__cause__``)."""


class DivergenceError(ImplicitDiffusionError, FloatingPointError):
    """Particles or parameters became non-finite: the step size (or learning rate) is too large."""


class NonFiniteError(ImplicitDiffusionError, ValueError):
    """A function (a user's reward, energy or score model) returned NaN or inf values."""
