"""Checks of config values: the rules every setting obeys, and those shared by the ``__post_init__``
of each experiment's config.

Each raises a one-line :class:`~implicit_diffusion.errors.ConfigError` naming the key, what is
allowed and the value given (shortened by :func:`short`). The tests are written as ``not ok(value)``
with ``ok`` a comparison, so NaN (for which every comparison is false) is rejected by construction.

:func:`check_fields` applies the rules that hold for every key of every experiment, from the
field types alone (it runs first in each config's ``__post_init__``, and again in
:func:`~implicit_diffusion.runtime.config.build_config` for configs that do not call it):

- a number (``float``) is finite and at most :data:`FLOAT_MAX` in magnitude, the largest float32:
  torch casts a Python scalar that multiplies a float32 tensor to float32 and raises on overflow
  (``param.add_(grad, alpha=-lr)`` with ``lr = 1e300``). A field that needs ±inf says so with
  ``field(metadata={"allow_inf": True})``;
- an integer is in (−2⁶³, 2⁶³) (:data:`INT_BOUND`), what torch's and numpy's int64 hold;
  ``seed`` is in [0, 2⁶³) (torch's generators take seeds below 2⁶⁴, and the experiments add small
  offsets to it); ``num_threads`` is in [0, this machine's CPU count] (0: automatic; more threads than
  CPUs only slow the run down, and 100,000 exhausted the machine's threads);
- a string has at most :data:`MAX_STRING` characters (a name or a path);
- lists obey the rules of their entries.

Key-specific bounds (``> 0``, ``in [0, 1)``, divisibility) stay in each ``__post_init__``, declared once
per key with :func:`check`, :func:`positive`, :func:`nonnegative` and :func:`one_of`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args, get_origin

from ..errors import ConfigError

__all__ = ["FLOAT_MAX", "INT_BOUND", "MAX_STRING", "SEED_ALLOWED", "check", "check_fields", "check_value", "clip",
           "cpu_count", "nonnegative", "one_of", "positive", "short"]

FLOAT_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
INT_BOUND = 2**63  # |v| < 2**63 (int64)
MAX_STRING = 4096  # characters: PATH_MAX on Linux
_SHORT = 60  # characters of a value echoed in an error message


def short(value: Any, limit: int = _SHORT) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted ("'aaa…' (100,000,000
    characters)"); an integer too long to print (Python refuses above 4,300 digits) is described by its
    number of digits. Never raises."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        digits = int(value.bit_length() * math.log10(2)) + 1  # within one of the exact count
        return f"{'-' if value < 0 else ''}an integer of about {digits:,} digits"
    try:
        text = repr(value)
    except Exception:  # a repr that fails (e.g. a nested list holding a huge int)
        return f"a {type(value).__name__}"
    return clip(text, limit)


def clip(text: str, limit: int = _SHORT) -> str:
    """``text`` itself, or its first ``limit`` characters and "… (N characters)"."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
            raise ConfigError(f"config key {name!r} must {verb} {requirement}, got {short(value)}")


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
        raise ConfigError(f"config key {name!r}: unknown {short(value)}; allowed: {', '.join(allowed)}")


# --- the rules of every field -------------------------------------------------------------------

SEED_ALLOWED = "an integer in [0, 2**63)"  # what every experiment's seed may be (also shown by `list`)


def _int_range(name: str) -> tuple[int, int, str]:
    """(low, high, what) with low <= v <= high allowed for an integer key."""
    if name == "seed":
        return 0, INT_BOUND - 1, SEED_ALLOWED
    if name == "num_threads":
        n = cpu_count()
        return 1, n, f"None (automatic) or an integer in [1, {n}] (this machine has {n} CPUs)"
    return -INT_BOUND + 1, INT_BOUND - 1, "an integer of magnitude < 2**63"


def check_value(name: str, value: Any, tp: Any, *, allow_inf: bool = False) -> None:
    """The rules of every field (see the module docstring) for ``value`` of a field of type ``tp``;
    values of another type are left to the type check of :func:`~.config.build_config`."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is not None:
            for inner in (a for a in get_args(tp) if a is not type(None)):
                check_value(name, value, inner, allow_inf=allow_inf)
        return
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            inner = get_args(tp)[0] if get_args(tp) else Any
            for v in value:
                _check_scalar(name, v, inner, allow_inf, entry=True)
        return
    _check_scalar(name, value, tp, allow_inf, entry=False)


def _check_scalar(name: str, value: Any, tp: Any, allow_inf: bool, *, entry: bool) -> None:
    if isinstance(value, bool) or get_origin(tp) is Literal:
        return
    if tp is float and isinstance(value, (int, float)):
        if not (abs(value) <= FLOAT_MAX or (allow_inf and math.isinf(value))):  # NaN fails both
            _refuse(name, value, "a number or ±inf" if allow_inf else
                    "a finite number of magnitude at most 3.4028e38 (float32's largest)", entry)
    elif tp is int and isinstance(value, int):
        low, high, allowed = _int_range(name)
        if not low <= value <= high:
            _refuse(name, value, allowed, entry)
    elif tp is str and isinstance(value, str) and len(value) > MAX_STRING:
        _refuse(name, value, f"a string of at most {MAX_STRING:,} characters", entry)


def _refuse(name: str, value: Any, allowed: str, entry: bool) -> None:
    if entry:
        raise ConfigError(f"config key {name!r}: each entry must be {allowed}, got {short(value)}")
    raise ConfigError(f"config key {name!r} must be {allowed}, got {short(value)}")


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], bool(f.metadata.get("allow_inf"))) for f in dataclasses.fields(cls))


def check_fields(config: Any) -> None:
    """Apply :func:`check_value` to every field of the dataclass instance ``config``."""
    for name, tp, allow_inf in _fields_of(type(config)):
        check_value(name, getattr(config, name), tp, allow_inf=allow_inf)
