"""Saving and loading score models as safetensors: weights plus a JSON description, no pickle.

A file holds the model's ``state_dict`` and string metadata:

- ``format``: ``"implicit-diffusion/score-model"``, ``version``: ``"1"``;
- ``class``: ``"ScoreMLP"`` or ``"UNet"``; ``config``: JSON of the constructor arguments
  (the model's ``config`` attribute), so ``CLASS(**config)`` rebuilds the architecture;
- ``schedule``: JSON of the :class:`~implicit_diffusion.samplers.schedules.VPSchedule` the model
  was trained with (its noise levels define what the network's time input means);
- ``extra``: free JSON (data set, training settings, how to reproduce the file).

Loading checks all of these and raises :class:`~implicit_diffusion.errors.DataError` with a
one-line reason for an absent, truncated or foreign file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import DataError
from ..serialization import save_tensors

__all__ = ["FORMAT", "ScoreModelFile", "check_model_config", "save_score_model", "load_score_model",
           "model_classes"]

FORMAT = "implicit-diffusion/score-model"
_VERSION = "1"


def model_classes() -> dict[str, type[torch.nn.Module]]:
    """Classes a file may name (imported here, not at module import, to keep imports light)."""
    from .score_nets import ScoreMLP
    from .unet import UNet

    return {"ScoreMLP": ScoreMLP, "UNet": UNet}


class ScoreModelFile(NamedTuple):
    """What :func:`load_score_model` returns."""

    model: torch.nn.Module
    schedule: Any  # VPSchedule
    extra: dict


def save_score_model(path: str | Path, model: torch.nn.Module, schedule, *, extra: dict | None = None) -> None:
    """Write ``model`` (its class must be one of :func:`model_classes`) and its schedule, atomically."""
    name = type(model).__name__
    if name not in model_classes() or not hasattr(model, "config"):
        raise TypeError(f"can save {', '.join(model_classes())} models only, got {name}")
    metadata = {
        "format": FORMAT,
        "version": _VERSION,
        "class": name,
        "config": json.dumps(model.config),
        "schedule": json.dumps(dataclasses.asdict(schedule)),
        "extra": json.dumps(extra or {}),
    }
    save_tensors(path, model.state_dict(), metadata)


def load_score_model(path: str | Path, *, device: str | torch.device = "cpu") -> ScoreModelFile:
    """Rebuild the model saved at ``path`` (in eval mode) with its schedule and extra metadata.

    Nothing is built from the metadata before it is checked: the JSON types and ranges of the
    constructor arguments (:func:`check_model_config`), then the architecture they describe, built
    on PyTorch's ``meta`` device (shapes, no memory), against the tensors the file holds — names,
    shapes, parameter count — read from the safetensors header alone. So a file claiming
    ``base_channels = 2**20`` (39 TB of weights) is a one-line :class:`DataError`, never an allocation."""
    from safetensors import SafetensorError, safe_open

    from ..samplers.schedules import VPSchedule

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such model file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an implicit-diffusion score model (metadata format={meta.get('format')!r})")
    if meta.get("version") != _VERSION:
        raise DataError(f"{path}: unsupported score-model file version {meta.get('version')!r}; allowed: {_VERSION}")
    classes = model_classes()
    name = meta.get("class")
    if name not in classes:
        raise DataError(f"{path}: unknown model class {name!r}; allowed: {', '.join(classes)}")
    config, schedule, extra = (_json(meta, key, path) for key in ("config", "schedule", "extra"))
    check_model_config(name, config, path)
    _check_tensors(name, config, shapes, path)
    if not isinstance(extra, dict):
        raise DataError(f"{path}: metadata 'extra' must be a JSON object, got {type(extra).__name__}")
    _check_data_shape(name, config, extra.get("data_shape"), path)
    if not isinstance(schedule, dict):
        raise DataError(f"{path}: metadata 'schedule' must be a JSON object, got {type(schedule).__name__}")
    try:
        schedule = VPSchedule(**schedule)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: malformed schedule in the metadata ({_line(e)})") from None
    try:
        model = classes[name](**config)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed model description ({_line(e)})") from None
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e})") from e
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not match the {name} it describes ({_line(e)})") from e
    return ScoreModelFile(model.to(device).eval(), schedule, extra)


# Each constructor argument: its JSON type and range. Widths are bounded only loosely here (2**24):
# the real bound is the tensors in the file, which must match the architecture exactly.
_WIDTH = (1, 1 << 24)
_CONFIG_KEYS: dict[str, dict[str, tuple]] = {
    "ScoreMLP": {"dim": ("int", *_WIDTH), "hidden": ("int", *_WIDTH), "depth": ("int", 1, 1 << 16),
                 "time_dim": ("int", 2, 1 << 16), "prediction": ("choice", "epsilon", "score", "x0")},
    "UNet": {"in_channels": ("int", *_WIDTH), "base_channels": ("int", *_WIDTH),
             "channel_mults": ("ints", 1, 1 << 10), "num_res_blocks": ("int", 1, 1 << 10),
             "time_dim": ("int", 2, 1 << 16), "groups": ("int", *_WIDTH), "dropout": ("number", 0.0, 1.0),
             "prediction": ("choice", "epsilon", "score", "x0"), "attention": ("bool",)},
}
_REQUIRED = {"ScoreMLP": ("dim",), "UNet": ()}
_MAX_LEVELS = 16  # len(channel_mults): an image side of 2**15 pixels per cell at the bottom


def check_model_config(name: str, config: Any, path: str | Path = "model file") -> None:
    """Refuse (one-line :class:`DataError`) a ``config`` of the wrong JSON type or range for class ``name``."""
    if not isinstance(config, dict):
        raise DataError(f"{path}: metadata 'config' must be a JSON object, got {type(config).__name__}")
    allowed = _CONFIG_KEYS[name]
    for key in config:
        if key not in allowed:
            raise DataError(f"{path}: unknown {name} config key {key!r}; allowed: {', '.join(allowed)}")
    for key in _REQUIRED[name]:
        if key not in config:
            raise DataError(f"{path}: {name} config key {key!r} is missing")
    for key, value in config.items():
        kind, *spec = allowed[key]
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and spec[0] <= value <= spec[1]
            want = f"an integer in {spec[0]}..{spec[1]}"
        elif kind == "ints":
            ok = (isinstance(value, list) and 1 <= len(value) <= _MAX_LEVELS
                  and all(isinstance(v, int) and not isinstance(v, bool) and spec[0] <= v <= spec[1] for v in value))
            want = f"a list of 1 to {_MAX_LEVELS} integers in {spec[0]}..{spec[1]}"
        elif kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and spec[0] <= value < spec[1]
            want = f"a number in [{spec[0]:g}, {spec[1]:g})"
        elif kind == "bool":
            ok, want = isinstance(value, bool), "true or false"
        else:
            ok, want = isinstance(value, str) and value in spec, f"one of {', '.join(spec)}"
        if not ok:
            raise DataError(f"{path}: {name} config key {key!r} = {_short(value)}; expected {want}")


def _check_tensors(name: str, config: dict, shapes: dict[str, tuple], path: Path) -> None:
    """The architecture of ``config`` (built on the meta device: no memory) against the file's tensors."""
    if name == "UNet":  # module count before building: every level's res blocks hold 8+ tensors each
        blocks = len(config.get("channel_mults", (1, 2))) * (2 * config.get("num_res_blocks", 1) + 1) + 2
        if 8 * blocks > len(shapes):
            raise DataError(f"{path}: the UNet config describes {blocks} residual blocks (at least {8 * blocks} "
                            f"tensors), the file holds {len(shapes)} tensors")
    elif 2 * (config.get("depth", 3) + 1) != len(shapes):
        raise DataError(f"{path}: the ScoreMLP config describes {config.get('depth', 3) + 1} linear layers "
                        f"({2 * (config.get('depth', 3) + 1)} tensors), the file holds {len(shapes)} tensors")
    try:
        with torch.device("meta"):
            skeleton = model_classes()[name](**config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: malformed model description ({_line(e)})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    claimed, held = sum(math.prod(s) for s in expected.values()), sum(math.prod(s) for s, _ in shapes.values())
    if expected.keys() != shapes.keys() or claimed != held:
        missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        detail = (f"missing {_short(missing)}" if missing else "") + ("; " if missing and unexpected else "") + \
                 (f"unexpected {_short(unexpected)}" if unexpected else "")
        raise DataError(f"{path}: weights do not match the {name} it describes: its config implies "
                        f"{claimed:,} parameters ({_bytes(4 * claimed)} in float32), the file holds {held:,} "
                        f"in {len(shapes)} tensors{'; ' + detail if detail else ''}")
    for k, shape in expected.items():
        if shapes[k][0] != shape:
            raise DataError(f"{path}: weights do not match the {name} it describes: tensor {k!r} has shape "
                            f"{shapes[k][0]}, the config implies {shape}")
        if shapes[k][1] not in _FLOAT_DTYPES:
            raise DataError(f"{path}: tensor {k!r} has dtype {shapes[k][1]}; expected one of "
                            f"{', '.join(_FLOAT_DTYPES)}")


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_data_shape(name: str, config: dict, shape: Any, path: Path) -> None:
    """``extra["data_shape"]`` (when recorded) must be what the model takes: (dim,) or (C, H, W)."""
    if shape is None:
        return
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                      for d in shape)):
        raise DataError(f"{path}: extra 'data_shape' = {_short(shape)}; expected a list of positive integers")
    if name == "ScoreMLP" and shape != [config["dim"]]:
        raise DataError(f"{path}: extra 'data_shape' = {shape} contradicts the ScoreMLP's dim = {config['dim']}")
    if name == "UNet":
        channels, divisor = config.get("in_channels", 1), 2 ** (len(config.get("channel_mults", (1, 2))) - 1)
        if len(shape) != 3 or shape[0] != channels or shape[1] % divisor or shape[2] % divisor:
            raise DataError(f"{path}: extra 'data_shape' = {shape} does not fit the UNet; expected "
                            f"[{channels}, H, W] with H and W multiples of {divisor}")


def _json(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise DataError(f"{path}: malformed model description (metadata key {key!r} is missing)")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: metadata {key!r} is not valid JSON ({_line(e)})") from None


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return " ".join((lines[0] if lines else type(e).__name__).split())[:300]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bytes(n: int) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
