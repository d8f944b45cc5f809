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
import functools
import json
import re
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
from .validation import check_value, clip, short

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

__all__ = ["CONFIG_SUFFIXES", "LEGACY_SENTINELS", "MAX_DEPTH", "MAX_FILE_BYTES", "build_config", "load_config_file",
           "parse_overrides", "config_to_dict", "config_to_toml", "with_setting_help", "without_legacy_sentinels",
           "explained_errors"]

C = TypeVar("C")


MAX_FILE_BYTES = 1_000_000  # a settings file is a few hundred bytes; this bounds the time and memory of parsing
MAX_OVERRIDE_CHARS = 100_000  # one --set key=value
MAX_DEPTH = 8  # nesting levels of a file (the mapping is 1; a list value 2); settings need 2
MAX_INT_CHARS = 1_000  # characters of an integer literal in YAML (settings hold integers below 2**63)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat mapping of settings from a ``.toml`` or ``.yaml``/``.yml`` file.

    Both parsers are safe: TOML is data only, and YAML goes through a subclass of
    ``yaml.SafeLoader`` (no tags that construct Python objects) that also refuses aliases and
    anchors (an alias bomb expands to gigabytes), duplicate keys (as TOML does) and integers of more
    than 1,000 characters. Files are at most 1 MB (:data:`MAX_FILE_BYTES`) and nested at most
    :data:`MAX_DEPTH` levels deep. Values are checked later by :func:`build_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {short(str(path), 300)} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"config file {short(str(path), 300)}: expected one of {', '.join(CONFIG_SUFFIXES)}, "
                          f"got {short(suffix)}")
    with path.open("rb") as f:  # read at most the bound (st_size may lie: a pipe, a growing file)
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        size = max(path.stat().st_size, len(raw))
        raise ConfigError(f"config file {short(str(path), 300)} has {size:,} bytes; a settings file may have at most "
                          f"{MAX_FILE_BYTES:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {short(str(path), 300)} is not valid UTF-8 text: {e}") from None
    if suffix == ".toml":
        data = _parse_toml(text, f"config file {short(str(path), 300)}")
    else:
        data = _parse_yaml(text, f"config file {short(str(path), 300)}")
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {short(str(path), 300)} must hold a flat mapping of setting names to values, "
                          f"got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.05", "optimizer=adam"]`` → ``{"lr": 0.05, "optimizer": "adam"}`` (values parsed as TOML,
    at most :data:`MAX_OVERRIDE_CHARS` characters and :data:`MAX_DEPTH` − 1 levels of lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {short(item)} must have the form key=value")
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {short(item)} is too long: at most {MAX_OVERRIDE_CHARS:,} characters")
        raw = raw.strip()
        try:
            out[key] = _parse_toml(f"v = {raw}", f"override {short(item)}", bare_words=True)["v"]
        except _BareWord:
            out[key] = raw  # a bare word: a string such as optimizer=adam
    return out


class _BareWord(Exception):
    """Not a TOML literal: the override's value is taken as a string."""


def _parse_toml(text: str, where: str, *, bare_words: bool = False) -> dict[str, Any]:
    """``tomllib.loads`` with its failures as one-line ConfigErrors (``bare_words``: a syntax error
    raises :class:`_BareWord` instead), and the depth bounded."""
    try:
        data = tomllib.loads(text)
    except RecursionError:  # tomllib recurses once per level of nested arrays or inline tables
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep; settings are numbers, strings, "
                          f"booleans or flat lists") from None
    except tomllib.TOMLDecodeError as e:
        if bare_words:
            raise _BareWord from None
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    except ValueError:  # Python's limit on int-string conversion (4,300 digits)
        raise ConfigError(f"{where} holds an integer too long to read; settings hold integers of magnitude "
                          f"< 2**63") from None
    _check_depth(data, where)
    return data


def _check_depth(data: Any, where: str) -> None:
    """Refuse values nested more than :data:`MAX_DEPTH` levels (iteratively: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep; settings are numbers, "
                                  f"strings, booleans or flat lists")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {clip(' '.join(str(e).split()), 300)}") from None
    except (ValueError, TypeError, OverflowError) as e:  # a tagged or dated scalar no constructor can build
        raise ConfigError(f"{where} is not valid YAML: {type(e).__name__}: {clip(' '.join(str(e).split()), 300)}") \
            from None
    except RecursionError:  # pragma: no cover - the composer's depth bound stops nesting first
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep") from None
    return {} if data is None else data


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses aliases, anchors, duplicate keys, deep nesting and huge integers."""
    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError

    class SettingsLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ComposerError(None, None, "aliases and anchors (*name, &name) are not allowed in a "
                                    "settings file", event.start_mark)
            if self._depth >= MAX_DEPTH:
                raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise ConstructorError(None, None, f"duplicate key {short(key_node.value)}",
                                               key_node.start_mark)
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            if len(node.value) > MAX_INT_CHARS:
                raise ConstructorError(None, None, f"an integer of {len(node.value):,} characters; settings hold "
                                       f"integers of magnitude < 2**63", node.start_mark)
            return super().construct_yaml_int(node)

    SettingsLoader.add_constructor("tag:yaml.org,2002:int", SettingsLoader.construct_yaml_int)
    return SettingsLoader


LEGACY_SENTINELS: dict[str, Any] = {"num_threads": 0, "checkpoint_every": 0, "max_batch": 0, "time_power": 0.0,
                                    "model": "", "diffusers_model": "", "data": ""}
"""What run directories of earlier releases wrote for "automatic" or "none" where the key is now None."""


def without_legacy_sentinels(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` of a saved run (its config.toml, its checkpoint's config) with the keys that hold an
    earlier release's sentinel (:data:`LEGACY_SENTINELS`) for a key that now defaults to None left out,
    so that they read back as None with the meaning they had; new configs get no such translation."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items()
            if not (k in LEGACY_SENTINELS and defaults.get(k, ...) is None and type(v) is type(LEGACY_SENTINELS[k])
                    and v == LEGACY_SENTINELS[k])}


def build_config(cls: type[C], *sources: Mapping[str, Any]) -> C:
    """Defaults of ``cls``, updated by each mapping in turn, validated and frozen.

    Each value is checked against the rules of every field
    (:func:`~implicit_diffusion.runtime.validation.check_value`: finite numbers, integers within
    int64, a bounded ``seed`` and ``num_threads``, strings of at most 4,096 characters) and its
    field's type, then the dataclass's ``__post_init__`` checks the key-specific bounds.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    try:
        for source in sources:
            for key, value in source.items():
                if key not in fields:
                    raise ConfigError(f"unknown config key {short(key)}; valid keys: {', '.join(sorted(fields))}; "
                                      f"see `implicit-diffusion list{_job_name(cls)}` for what each means")
                check_value(key, value, hints[key], allow_inf=bool(fields[key].metadata.get("allow_inf")))
                values[key] = _coerce(key, value, hints[key])
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        raise with_setting_help(cls, e) from None


def explained_errors(cls: type[C]) -> type[C]:
    """Class decorator for an experiment's config dataclass: a :class:`ConfigError` raised by its
    ``__post_init__`` that names one setting ends with that setting's help (:func:`with_setting_help`),
    so ``Config(lr=-1)`` from Python explains itself as ``--set lr=-1`` does on the command line."""
    check = cls.__post_init__

    @functools.wraps(check)
    def __post_init__(self) -> None:
        try:
            check(self)
        except ConfigError as e:
            raise with_setting_help(type(self), e) from None

    cls.__post_init__ = __post_init__
    return cls


_KEY_IN_MESSAGE = re.compile(r"config key '([A-Za-z_][A-Za-z0-9_]*)'")


def with_setting_help(cls: type, error: ConfigError) -> ConfigError:
    """``error`` with the help text of the one setting of ``cls`` it names ("config key 'lr' ..."), the
    same text `implicit-diffusion list` prints: "... [lr: Adam's learning rate. Allowed: > 0.]"; as it
    was when it names no setting, several, or an unknown key."""
    from .settings import describe, settings_of

    message = str(error)
    named = set(_KEY_IN_MESSAGE.findall(message))
    if len(named) != 1 or message.startswith("unknown config key"):
        return error
    (key,) = named
    if f" [{key}: " in message:  # already explained (by the config's own __post_init__: explained_errors)
        return error
    found = next((s for s in settings_of(cls) if s.name == key and s.help), None)
    if found is None:
        return error
    return ConfigError(f"{message} [{key}: {clip(describe(found), 400)}]")


def _job_name(cls: type) -> str:
    """" NAME" of the command that runs the config class ``cls`` (an experiment's module
    ``experiments.langevin_mixture`` runs as ``langevin-mixture``), or "" for a class of no experiment."""
    package, _, module = cls.__module__.rpartition(".")
    return f" {module.replace('_', '-')}" if package.endswith(".experiments") else ""


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
        return ConfigError(f"config key {key!r}: expected {_describe(tp)}, got {short(value)}")

    origin = get_origin(tp)
    if _is_optional(tp):  # None: the key omitted, or --set key=None as the settings help writes it
        return None if value is None or value == "None" else _coerce(key, value, _non_none(tp))
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
