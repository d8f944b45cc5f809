"""What a checkpoint holds: the state of a run's parts, as tensors plus JSON.

Two helpers, so that an experiment names what it carries instead of spelling out how each
piece is saved:

- :func:`state_of` / :func:`load_state_of` take the *live objects* of a loop by name — a
  ``torch.nn.Module`` (its ``state_dict`` under ``"NAME."``), a ``torch.optim`` optimizer
  (:func:`~implicit_diffusion.serialization.optimizer_state` under ``"NAME"``), a learning-rate
  scheduler (its ``state_dict`` as JSON), a ``torch.Generator`` (its state, a uint8 tensor, and
  its device type in the JSON), any
  object with ``state(prefix) -> (tensors, meta)`` and ``load_state(tensors, meta, prefix)``
  (the recorders), or None (nothing) — and save or restore them in place.
- :func:`pack` / :func:`unpack` turn a *result record* (a dataclass, dict, list or tuple of
  tensors, NumPy arrays, floats, ints, strings, None) into tensors and a JSON tree and back.
  Floats go into float64 tensors, so NaN and ±inf survive (the checkpoint's JSON allows
  neither) and every value comes back bit for bit; ints and strings stay JSON.

**Devices.** Restoring follows the live objects, like ``torch.load``'s ``map_location``: a
module's ``load_state_dict`` copies onto its parameters' device, ``torch.optim`` moves its
state to its parameters', and objects with ``load_state`` place their own tensors. A
generator's stream cannot move between device types (a CUDA generator's state is a seed and an
offset, a CPU one's a Mersenne Twister), so a generator saved on one type and restored on
another is re-seeded from a hash of the saved state — deterministic, the same law, not the
same draws — with a :class:`CrossDeviceResume` warning
(:func:`~implicit_diffusion.serialization.load_generator_state`). On the same device type, bit
for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..serialization import (
    CrossDeviceResume,
    load_generator_state,
    load_optimizer_state,
    optimizer_state,
    strip_prefix,
    with_prefix,
)

__all__ = ["CrossDeviceResume", "load_state_of", "pack", "state_of", "unpack"]

_PLAIN = (bool, int, str, type(None))


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


def state_of(parts: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` holding every part's state, each under its name (see the module docstring);
    tensor names start with ``prefix`` (e.g. ``"run."``), ``meta`` is keyed by the bare names. The
    tensors are copies: training on does not change a state taken before.

    >>> g = torch.Generator().manual_seed(0)
    >>> tensors, meta = state_of({"net": torch.nn.Linear(2, 1), "generator": g})
    >>> sorted(tensors), meta
    (['generator', 'net.bias', 'net.weight'], {'generator': {'device': 'cpu'}})
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for name, part in parts.items():
        full = prefix + name
        if part is None:
            meta[name] = None
        elif isinstance(part, torch.nn.Module):
            tensors.update(with_prefix({k: v.detach().clone() for k, v in part.state_dict().items()}, f"{full}."))
        elif isinstance(part, torch.optim.Optimizer):
            t, meta[name] = optimizer_state(part, full)
            tensors.update({k: v.clone() for k, v in t.items()})
        elif _is_scheduler(part):
            meta[name] = part.state_dict()
        elif isinstance(part, torch.Generator):
            tensors[full] = part.get_state()
            meta[name] = {"device": part.device.type}
        elif hasattr(part, "state") and hasattr(part, "load_state"):
            t, meta[name] = part.state(full)
            tensors.update(t)
        else:
            raise TypeError(f"part {name!r}: cannot save a {type(part).__name__}")
    return tensors, meta


def load_state_of(parts: Mapping[str, Any], tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                  prefix: str = "") -> None:
    """Inverse of :func:`state_of` (with the same ``prefix``): restore every part in place."""
    for name, part in parts.items():
        full = prefix + name
        if part is None:
            continue
        if isinstance(part, torch.nn.Module):
            part.load_state_dict(strip_prefix(tensors, f"{full}."))
        elif isinstance(part, torch.optim.Optimizer):
            load_optimizer_state(part, tensors, meta[name], full)
        elif _is_scheduler(part):
            part.load_state_dict(meta[name])
        elif isinstance(part, torch.Generator):
            saved = meta.get(name)
            device = saved.get("device", "cpu") if isinstance(saved, Mapping) else "cpu"
            load_generator_state(part, tensors[full], device)
        elif hasattr(part, "load_state"):
            part.load_state(tensors, meta[name], full)
        else:
            raise TypeError(f"part {name!r}: cannot load a {type(part).__name__}")


def pack(value: Any, name: str) -> tuple[dict[str, Tensor], list]:
    """``value`` as ``(tensors, tree)``: tensors named ``name…`` (copies), and a JSON tree saying where
    everything goes back (:func:`unpack`). A dataclass is packed as the dict of its fields.

    >>> tensors, tree = pack({"step": [0, 100], "reward": [0.5, float("nan")]}, "evals")
    >>> sorted(tensors), unpack(tree, tensors)["step"]
    (['evals.reward'], [0, 100])
    """
    tensors: dict[str, Tensor] = {}
    return tensors, _pack(value, name, tensors)


def _pack(value: Any, name: str, tensors: dict[str, Tensor]) -> list:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Tensor):
        tensors[name] = value.detach().clone()
        return ["tensor", name]
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(np.array(value, copy=True, order="C"))
        return ["array", name]
    if isinstance(value, float):  # np.float64 too
        tensors[name] = torch.tensor(float(value), dtype=torch.float64)
        return ["float", name]
    if isinstance(value, _PLAIN):
        return ["json", value]
    if isinstance(value, Mapping):
        return ["dict", [[k, _pack(v, f"{name}.{k}", tensors)] for k, v in value.items()]]
    if isinstance(value, list) and all(isinstance(v, _PLAIN) for v in value):
        return ["json", list(value)]
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        tensors[name] = torch.tensor(value, dtype=torch.float64)
        return ["floats", name]
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return [kind, [_pack(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]]
    raise TypeError(f"{name}: cannot pack a {type(value).__name__}")


def unpack(tree: list, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`pack`: the value, with arrays as NumPy arrays and floats as Python floats."""
    kind, payload = tree
    if kind == "tensor":
        return tensors[payload]
    if kind == "array":
        return tensors[payload].numpy().copy()
    if kind == "float":
        return float(tensors[payload])
    if kind == "floats":
        return tensors[payload].tolist()
    if kind == "json":
        return payload
    if kind == "dict":
        return {k: unpack(v, tensors) for k, v in payload}
    if kind in ("list", "tuple"):
        items = [unpack(v, tensors) for v in payload]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown packed kind {kind!r}")
