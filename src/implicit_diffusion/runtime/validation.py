"""Checks of config values shared by every experiment's ``__post_init__``.

Each raises a one-line :class:`~implicit_diffusion.errors.ConfigError` naming the key, what is
allowed and the value given. The tests are written as ``not ok(value)`` with ``ok`` a comparison,
so NaN (for which every comparison is false) is rejected by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigError

__all__ = ["check", "nonnegative", "one_of", "positive"]


def check(config: Any, names: str | Iterable[str], ok: Callable[[Any], bool], requirement: str, *,
          verb: str = "be") -> None:
    """Every key in ``names`` must satisfy ``ok``; otherwise "config key 'NAME' must VERB REQUIREMENT,
    got VALUE" (``verb="hold"`` for lists: "must hold integers >= 1").

    >>> from types import SimpleNamespace
    >>> check(SimpleNamespace(lr=float("nan")), "lr", lambda v: v > 0, "> 0")
    Traceback (most recent call last):
    ...
    implicit_diffusion.errors.ConfigError: config key 'lr' must be > 0, got nan
    """
    for name in [names] if isinstance(names, str) else names:
        value = getattr(config, name)
        if not ok(value):
            raise ConfigError(f"config key {name!r} must {verb} {requirement}, got {value!r}")


def positive(config: Any, *names: str) -> None:
    """Each key must be > 0."""
    check(config, names, lambda v: v > 0, "> 0")


def nonnegative(config: Any, *names: str, note: str = "") -> None:
    """Each key must be >= 0 (``note``, e.g. ``"(0 = automatic)"``, follows the requirement)."""
    check(config, names, lambda v: v >= 0, f">= 0 {note}".rstrip())


def one_of(config: Any, name: str, allowed: Iterable[str]) -> None:
    """The key's value must be one of ``allowed``: "config key 'NAME': unknown 'X'; allowed: A, B"."""
    allowed = list(allowed)
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"config key {name!r}: unknown {value!r}; allowed: {', '.join(allowed)}")
