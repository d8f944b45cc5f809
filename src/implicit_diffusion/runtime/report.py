"""Reports: every metric of one or several run directories as PNGs, plus a Markdown summary.

``implicit-diffusion report RUN_DIR [RUN_DIR ...] [--out DIR]`` reads each run's
``config.toml``, ``metrics.jsonl``, ``summary.json`` and ``run.json``, and writes to ``DIR``
(default ``RUN_DIR/report`` for one run):

- ``metric-NAME.png``: every numeric metric against its step axis, one line per series (a
  series is a run and the record's labels: method, algorithm, run, rule, seed), log-scaled when
  positive and spanning more than two decades, a running mean when there are many points;
- ``report.md``: the runs' experiment and settings (only the differing ones when comparing),
  their summaries side by side, the figures each run wrote itself, and the metric plots.

Metric records are whatever the experiment wrote: the x axis is the first of ``step``,
``update``, ``sampler_steps``, ``K`` a record has (records with none are tabulated only).

A damaged ``metrics.jsonl`` (a line cut by a crash, bytes that are not UTF-8, text that is not a
JSON object, a number that is not finite — ``NaN``, an integer of 400 digits — or too large to
plot) is read around: each such line or value is left out with a one-line warning on stderr
naming the file and the line (``implicit-diffusion: warning: runs/a/metrics.jsonl:7: …``); a
file with lines but none usable is one :class:`~implicit_diffusion.errors.DataError`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError, RunDirError
from ..plotting.base import COLORS, figure, running_mean

__all__ = ["RunData", "Scalars", "load_run", "record_scalars", "write_report"]

X_KEYS = ("step", "update", "sampler_steps", "K")
LABEL_KEYS = ("method", "algorithm", "run", "rule", "seed")
# beyond this, matplotlib's axis arithmetic (span × margin, tick steps) overflows; metrics.jsonl
# also writes ±inf as ±1e308 (rundir._clean), which is not a value to plot
PLOT_LIMIT = 1e300
MAX_WARNINGS = 20  # per metrics file; the rest are counted in one line


class RunData:
    """What a run directory holds: name, experiment, config, summary, metric series, own figures."""

    def __init__(self, path: Path, experiment: str, config: dict[str, Any], summary: dict[str, Any],
                 series: dict[str, dict[str, tuple[list[float], list[float]]]], x_label: dict[str, str],
                 figures: list[str]):
        self.path = path
        self.name = path.name
        self.experiment = experiment
        self.config = config
        self.summary = summary
        self.series = series  # metric → series label → (x, y)
        self.x_label = x_label  # metric → name of its x axis
        self.figures = figures


def load_run(path: str | Path) -> RunData:
    """Read a run directory (a one-line :class:`RunDirError` if it is not one)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = Path(path)
    if not (path / "config.toml").is_file():
        raise RunDirError(f"{str(path)!r} is not a run directory (no config.toml)")
    try:
        config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise RunDirError(f"{str(path / 'config.toml')!r} is not valid TOML: {e}") from None
    info = _read_json(path / "run.json") or {}
    summary = _read_json(path / "summary.json") or {}
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    x_label: dict[str, str] = {}
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        _read_metrics(metrics, series, x_label)
    figures = sorted(p.name for p in path.glob("*.png"))
    return RunData(path, info.get("experiment", "unknown experiment"), config, summary, dict(series), x_label,
                   figures)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of over 4300 digits, deep nesting
        raise RunDirError(f"{str(path)!r} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else None


class Scalars(NamedTuple):
    """A metric record's plottable content: its step axis, its label fields, its finite numbers."""

    x_key: str  # which of X_KEYS the record has
    x: float
    labels: list[str]  # the values of its LABEL_KEYS fields, in that order
    values: dict[str, float]  # metric name → finite number
    skipped: tuple[str, ...] = ()  # numeric fields left out: not finite (NaN, ±inf, an int beyond float range)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> float | None:
    """A number as a finite float, or None (NaN, ±inf, an integer too large for a float)."""
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def record_scalars(record) -> Scalars | None:
    """The scalars of one ``metrics.jsonl`` record (None if it has no step axis, or a step that is
    not a finite number): what ``report`` plots and ``--tensorboard`` writes. Non-numeric fields
    (strings, lists, null) are not metrics; numbers that are not finite are named in ``skipped``."""
    if not isinstance(record, dict):
        return None
    x_key = next((k for k in X_KEYS if _is_number(record.get(k))), None)
    x = None if x_key is None else _finite(record[x_key])
    if x is None:
        return None
    labels = [str(record[k]) for k in LABEL_KEYS if record.get(k) is not None]
    values: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in record.items():
        if key in X_KEYS or key in LABEL_KEYS or not _is_number(value):
            continue
        number = _finite(value)
        if number is None:
            skipped.append(key)
        else:
            values[key] = number
    return Scalars(x_key, x, labels, values, tuple(skipped))


def _warn(message: str) -> None:
    print(f"implicit-diffusion: warning: {message}", file=sys.stderr)


def _short(value: Any, limit: int = 40) -> str:
    """A value for a message (json.dumps of a 400-digit integer would fill the line)."""
    text = json.dumps(value) if isinstance(value, float) else str(value)
    return text if len(text) <= limit else f"{text[:12]}…({len(text)} characters)"


def _read_metrics(path: Path, series, x_label) -> None:
    """Add the records of ``metrics.jsonl`` to ``series``, leaving out (with a warning each) the lines
    that cannot be read and the values that are not finite numbers; a :class:`DataError` if lines
    are there but none can be used."""
    data = path.read_bytes()
    lines = data.split(b"\n")  # JSON Lines: only a newline ends a record (json.dumps escapes the others)
    if lines[-1] == b"":
        lines.pop()
    problems: list[tuple[int, str]] = []  # (line number, what is wrong with it)
    used = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append((number, f"not UTF-8 text (byte {e.start + 1} of the line); line skipped"))
            continue
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of over 4300 digits, nesting
            cut = number == len(lines) and not data.endswith(b"\n")
            why = "cut off (the run stopped while writing it?)" if cut else f"not JSON ({' '.join(str(e).split())})"
            problems.append((number, f"{why}; line skipped"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"a JSON {type(record).__name__}, not a record (an object); line skipped"))
            continue
        x_key = next((k for k in X_KEYS if _is_number(record.get(k))), None)
        x = None if x_key is None else _finite(record[x_key])
        if x_key is not None and (x is None or abs(x) > PLOT_LIMIT):
            problems.append((number, f"{x_key} = {_short(record[x_key])} is not a finite number "
                                     f"(or beyond ±{PLOT_LIMIT:g}); record skipped"))
            continue
        used += 1
        scalars = record_scalars(record)
        if scalars is None:  # no step axis: tabulated nowhere, plotted never
            continue
        bad = [*scalars.skipped, *(k for k, v in scalars.values.items() if abs(v) > PLOT_LIMIT)]
        problems += [(number, f"{key!r} = {_short(record[key])} is not a finite number (or beyond "
                              f"±{PLOT_LIMIT:g}); value skipped") for key in bad]
        _add_record(scalars._replace(values={k: v for k, v in scalars.values.items() if k not in bad}),
                    series, x_label)
    if problems and not used:
        first, why = problems[0]
        raise DataError(f"{str(path)!r} has no usable record: {len(problems)} bad line(s), the first, "
                        f"line {first}: {why.rsplit('; ', 1)[0]}")
    for number, why in problems[:MAX_WARNINGS]:
        _warn(f"{path}:{number}: {why}")
    if len(problems) > MAX_WARNINGS:
        _warn(f"{path}: {len(problems) - MAX_WARNINGS} more lines or values skipped")


def _add_record(scalars: Scalars, series, x_label) -> None:
    label = ", ".join(scalars.labels)
    for key, value in scalars.values.items():
        xs, ys = series[key].setdefault(label, ([], []))
        xs.append(scalars.x)
        ys.append(value)
        x_label.setdefault(key, scalars.x_key)


def write_report(run_dirs: list[str | Path], out: str | Path) -> list[str]:
    """Write ``report.md`` and ``metric-*.png`` for ``run_dirs`` into ``out``; returns the file names."""
    if not run_dirs:
        raise RunDirError("report needs at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    names = _unique_names(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    metrics = sorted({m for r in runs for m in r.series})
    for metric in metrics:
        fname = f"metric-{_slug(metric)}.png"
        _plot_metric(out / fname, metric, [(n, r) for n, r in zip(names, runs) if metric in r.series])
        files.append(fname)
    (out / "report.md").write_text(_markdown(runs, names, files, out), encoding="utf-8")
    return ["report.md", *files]


def _unique_names(runs: list[RunData]) -> list[str]:
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.path.parent.name})" for n, r in zip(names, runs)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "metric"


def _plot_metric(path: Path, metric: str, runs: list[tuple[str, RunData]]) -> None:
    fig = figure(6.4, 3.6)
    ax = fig.subplots()
    lines = [(f"{name}: {label}" if len(runs) > 1 and label else (label or name), xy)
             for name, run in runs for label, xy in sorted(run.series[metric].items())]
    all_y = np.concatenate([np.asarray(y) for _, (_, y) in lines])
    for i, (label, (x, y)) in enumerate(lines):
        x, y = np.asarray(x), np.asarray(y)
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        color = COLORS[i % len(COLORS)]
        if len(y) > 400:  # per-step noise: faint raw values, a running mean on top
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.6)
            ax.plot(x, running_mean(y, max(5, len(y) // 100)), color=color, linewidth=1.4, label=label)
        else:
            ax.plot(x, y, color=color, linewidth=1.4, marker="." if len(y) < 60 else None, label=label)
    positive = bool((all_y > 0).all())
    if positive and np.log10(all_y.max()) - np.log10(all_y.min()) > 2:  # a ratio could overflow
        ax.set_yscale("log")
    x_keys = {run.x_label.get(metric, "step") for _, run in runs}
    ax.set_xlabel(" / ".join(sorted(x_keys)))
    ax.set_ylabel(metric)
    ax.set_title(metric, fontsize=10)
    if len(lines) > 1 or lines[0][0]:
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value[:8]) + (", …" if len(value) > 8 else "") + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in list(value.items())[:6]) + "}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(runs: list[RunData], names: list[str], metric_files: list[str], out: Path) -> str:
    import os

    title = names[0] if len(runs) == 1 else f"{len(runs)} runs"
    parts = [f"# Report: {title}", ""]
    parts.append(_table(["run", "experiment", "directory"],
                        [[n, r.experiment, str(r.path)] for n, r in zip(names, runs)]))
    keys = sorted({k for r in runs for k in r.config})
    if len(runs) > 1:
        keys = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    parts += ["", "## Settings" + (" that differ" if len(runs) > 1 else ""), ""]
    parts.append(_table(["setting", *names], [[k, *(_fmt(r.config.get(k, "—")) for r in runs)] for k in keys])
                 if keys else "(identical settings)")
    skeys = sorted({k for r in runs for k in r.summary})
    parts += ["", "## Results (summary.json)", ""]
    parts.append(_table(["quantity", *names], [[k, *(_fmt(r.summary.get(k, "—")) for r in runs)] for k in skeys])
                 if skeys else "(no summary.json: the run did not finish)")
    figures = [(n, r, f) for n, r in zip(names, runs) for f in r.figures]
    if figures:
        parts += ["", "## Figures written by the runs", ""]
        for n, r, f in figures:
            rel = os.path.relpath(r.path / f, out)
            parts += [f"**{n}: {f}**", "", f"![{n} {f}]({rel})", ""]
    if metric_files:
        parts += ["", "## Metrics", ""]
        parts += [f"![{f}]({f})\n" for f in metric_files]
    return "\n".join(parts).rstrip() + "\n"
