"""Configuration as data: frozen dataclasses, loaded from TOML or YAML and ``key=value`` overrides.

Every experiment has a frozen dataclass of settings. :func:`build_config` starts from its
defaults, applies a TOML or YAML file (a flat mapping of field names to values),
then ``--set key=value`` overrides (values in TOML syntax: ``lr=0.05``,
``theta0=[1, 0, 1, 0, 1, 0]``, ``optimizer="adam"`` or simply ``optimizer=adam``), and
checks every key and value against the dataclass's field types. Errors name the key and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

__all__ = ["CONFIG_SUFFIXES", "build_config", "load_config_file", "parse_overrides", "config_to_dict", "config_to_toml"]

C = TypeVar("C")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat mapping of settings from a ``.toml`` or ``.yaml``/``.yml`` file.

    Both parsers are safe: TOML is data only, and YAML goes through ``yaml.safe_load`` (no tags
    that construct Python objects). Values are checked later by :func:`build_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"config file {str(path)!r}: expected one of {', '.join(CONFIG_SUFFIXES)}, got {suffix!r}")
    if suffix == ".toml":
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {str(path)!r} must hold a flat mapping of setting names to values, "
                          f"got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.05", "optimizer=adam"]`` → ``{"lr": 0.05, "optimizer": "adam"}`` (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must have the form key=value")
        raw = raw.strip()
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # a bare word: a string such as optimizer=adam
    return out


def build_config(cls: type[C], *sources: Mapping[str, Any]) -> C:
    """Defaults of ``cls``, updated by each mapping in turn, validated and frozen."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
            values[key] = _coerce(key, value, hints[key])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_to_toml(config: Any) -> str:
    """The resolved config as flat TOML that :func:`build_config` reads back to the same object."""
    lines = []
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for key, value in config_to_dict(config).items():
        if value is None:  # TOML has no null: an omitted key reads back as its default, which must be None
            if defaults[key] is not None:
                raise ValueError(f"config key {key!r} is None but defaults to {defaults[key]!r}: TOML cannot say so")
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if _is_optional(tp):
        return f"{_describe(_non_none(tp))} or omitted"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _non_none(tp: Any) -> Any:
    (inner,) = [a for a in get_args(tp) if a is not type(None)]
    return inner


def _coerce(key: str, value: Any, tp: Any) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"config key {key!r}: expected {_describe(tp)}, got {value!r}")

    origin = get_origin(tp)
    if _is_optional(tp):
        return None if value is None else _coerce(key, value, _non_none(tp))
    if origin is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner, *_rest) = get_args(tp)
        return tuple(_coerce(key, v, inner) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise ConfigError(f"config key {key!r} has an unsupported type {tp}")  # pragma: no cover
