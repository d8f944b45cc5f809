"""Settings that describe themselves: each config field carries its help text, unit and allowed values once.

An experiment's config declares a field with :func:`setting`::

    step_size: float | None = setting(None, "γ of ULA; None (the default): the data set's own", allowed="> 0")

and that one declaration feeds ``implicit-diffusion list EXP``, ``implicit-diffusion run EXP --help``, the
"unknown config key" error, the help quoted after every config error that names one key
(:func:`~.config.with_setting_help`; a config class decorated with :func:`~.config.explained_errors` quotes it
when built from Python too) and the tables of ``docs/settings.md`` (:func:`render_markdown`; regenerate
with ``implicit-diffusion list --markdown > docs/settings.md``, a test checks the file is current).
For ``Literal`` types the allowed values come from the type.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin

__all__ = ["Setting", "describe", "experiment_summary", "render_markdown", "render_text", "setting", "settings_of"]


def setting(default: Any, help: str, *, unit: str | None = None, allowed: str | Iterable[str] | None = None,
            **metadata: Any) -> Any:
    """A dataclass field with ``default`` and its description: ``help`` (what it means), ``unit`` (e.g.
    ``"seconds"``) and ``allowed`` (a bound such as ``"> 0"``, or the allowed strings). Further keyword
    arguments (``allow_inf=True``) join the field's metadata."""
    if not isinstance(help, str) or not help.strip():
        raise ValueError("a setting needs a help text")
    if allowed is not None and not isinstance(allowed, str):
        allowed = tuple(allowed)
    return dataclasses.field(default=default, metadata={"help": help, "unit": unit, "allowed": allowed, **metadata})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of a config as the user sees it."""

    name: str
    default: str  # in TOML syntax, as ``--set`` takes it ("None" when omitted)
    help: str  # "" when the field has none
    unit: str | None
    allowed: str | None


def _toml(value: Any) -> str:
    if value is None:
        return "None"
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def _allowed(field: dataclasses.Field, tp: Any) -> str | None:
    allowed = field.metadata.get("allowed")
    if allowed is None and field.name == "seed":  # the rule every seed obeys (runtime.validation)
        from .validation import SEED_ALLOWED

        return SEED_ALLOWED
    if isinstance(allowed, str):
        return allowed
    if allowed is not None:
        return "one of " + ", ".join(allowed)
    inner = tp
    if get_origin(inner) is tuple:
        inner = get_args(inner)[0]
    if get_origin(inner) in (typing.Union, types.UnionType):
        inner = next((a for a in get_args(inner) if a is not type(None)), inner)
    if get_origin(inner) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(inner))
    return None


def settings_of(cls: type) -> list[Setting]:
    """Every field of the config dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [Setting(f.name, _toml(f.default), str(f.metadata.get("help", "")), f.metadata.get("unit"),
                    _allowed(f, hints[f.name])) for f in dataclasses.fields(cls)]


def describe(s: Setting) -> str:
    """The help text with its unit and allowed values: "γ of ULA. Unit: … Allowed: > 0."."""
    text = s.help.rstrip()
    if text and not text.endswith("."):
        text += "."
    if s.unit:
        text += f" Unit: {s.unit}."
    if s.allowed:
        text += f" Allowed: {s.allowed}."
    return text.strip()


def experiment_summary(module: Any) -> str:
    """The one-line description of an experiment: its module docstring's first line, without the
    "Experiment ``name``:" label."""
    first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    head, sep, rest = first.partition(": ")
    return rest.strip() if sep and head.startswith(("Experiment", "Job")) else first.strip()


def render_text(cls: type, *, indent: str = "  ", width: int = 100) -> str:
    """Every key of ``cls`` as ``key = default`` and, indented below, its description (for the terminal)."""
    lines = []
    for s in settings_of(cls):
        lines.append(f"{indent}{s.name} = {s.default}")
        lines.extend(textwrap.wrap(describe(s) or "(no description)", width=width, break_on_hyphens=False,
                                   initial_indent=indent + "    ", subsequent_indent=indent + "    "))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(jobs: Mapping[str, Any]) -> str:
    """``docs/settings.md``: one table of settings per job (``name → module`` with ``Config``, its
    docstring and optionally ``PRESETS``)."""
    out = ["# Settings", "",
           "Every key of every experiment, with its default, meaning, unit and allowed values: what",
           "`implicit-diffusion list EXP` prints. Set them with `--set key=value` (values in TOML syntax) or in a",
           "`--config` file. None (\"automatic\", \"none\") is `--set key=None`, or the key left out of a file",
           "(TOML has no null).", "",
           "This page is generated from the config dataclasses; regenerate it with",
           "`implicit-diffusion list --markdown > docs/settings.md` (a test fails when it is out of date).", ""]
    for name, module in jobs.items():
        command = "pretrain DATASET" if name == "pretrain" else f"run {name}"
        out += [f"## {name}", "", f"`implicit-diffusion {command}`: {experiment_summary(module)}", "",
                "| key | default | meaning | unit | allowed |", "| --- | --- | --- | --- | --- |"]
        for s in settings_of(module.Config):
            out.append(f"| `{s.name}` | `{_cell(s.default)}` | {_cell(s.help)} | {_cell(s.unit or '')} | "
                       f"{_cell(s.allowed or '')} |")
        presets = getattr(module, "PRESETS", {})
        if presets:
            out.append("")
            for preset, values in presets.items():
                out.append(f"- `--preset {preset}`: " + ", ".join(f"`{k} = {_toml(v)}`" for k, v in values.items()))
        out.append("")
    return "\n".join(out)
