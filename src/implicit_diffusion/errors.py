"""The project's own exception types: what the CLI turns into one-line errors (exit code 2)."""

from __future__ import annotations

__all__ = ["ImplicitDiffusionError", "ConfigError", "RunDirError"]


class ImplicitDiffusionError(Exception):
    """Base class of the errors this package raises on bad input."""


class ConfigError(ImplicitDiffusionError, ValueError):
    """An unknown configuration key, or a value of the wrong type or outside the allowed set."""


class RunDirError(ImplicitDiffusionError, OSError):
    """The output directory cannot be used (exists and is not empty, or is not writable)."""
