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

**Validation.** :func:`load_state_of` first checks the saved state against the live objects
(:func:`~.state_checks.check_state_of`): every tensor a module, optimizer or generator will receive must be
there, with the live object's shape and dtype, nothing unexpected may lie under the prefix,
and every part's JSON record must be of the right kind. A checkpoint that fails is a one-line
:class:`~implicit_diffusion.errors.DataError` ("checkpoint PATH: tensor 'theta' has shape (3,),
the run's is (6,)") raised before anything is loaded. Objects with ``load_state`` (recorders,
algorithms) are checked again after loading: what they then save must be what was saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..serialization import (
    CrossDeviceResume,
    load_generator_state,
    load_optimizer_state,
    optimizer_state,
    strip_prefix,
    with_prefix,
)
from .state_checks import _claims, _has_state, _is_scheduler, _same, _shape, check_like, check_state_of
from .validation import short

__all__ = ["CrossDeviceResume", "check_like", "check_state_of", "fingerprint", "load_state_of", "pack", "state_of",
           "unpack"]

_PLAIN = (bool, int, str, type(None))


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
                  prefix: str = "", *, like: Mapping[str, Tensor | None] | None = None,
                  source: str = "checkpoint", exhaustive: bool = False) -> None:
    """Inverse of :func:`state_of` (with the same ``prefix``): restore every part in place, after
    :func:`check_state_of` (``like``, ``source``, ``exhaustive``: see there; a run's checkpoint is
    restored exhaustively, by :meth:`~implicit_diffusion.runtime.checkpoints.Checkpoints.restore`,
    while a caller may restore some parts only) found the saved state fits them.
    An object with ``load_state`` that fails on its record, or that afterwards would save other
    tensors than those saved, is a :class:`~implicit_diffusion.errors.DataError` too."""
    check_state_of(parts, tensors, meta, prefix, like=like, source=source, exhaustive=exhaustive)
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
        elif _has_state(part):
            _load_checked(part, name, full, tensors, meta[name], source,
                          {k for k in tensors if _claims(parts, prefix, k) == name})
        else:
            raise TypeError(f"part {name!r}: cannot load a {type(part).__name__}")


def _load_checked(part: Any, name: str, full: str, tensors: Mapping[str, Tensor], record: Mapping,
                  source: str, owned: set[str]) -> None:
    """``part.load_state``; then what it would save must be what was saved (names, shapes, dtypes)."""
    try:
        part.load_state(tensors, record, full)
        again, _ = part.state(full)
    except DataError as e:
        raise DataError(f"{source}: part {name!r}: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise DataError(f"{source}: part {name!r} cannot be restored from its record "
                        f"({type(e).__name__}: {detail})") from None
    for key in sorted(owned - set(again)):
        raise DataError(f"{source}: unexpected tensor {key!r} (the run's {name!r} has no such state)")
    for key in sorted(again):
        if key not in tensors:
            raise DataError(f"{source}: tensor {key!r} is missing")
        _same(source, key, tensors[key], again[key])


def fingerprint(value: Tensor | Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes, or of named tensors in name order: what a
    checkpoint records of the data (or weights) its run started from.

    >>> a = fingerprint(torch.zeros(2))
    >>> a == fingerprint(torch.zeros(2)), a == fingerprint(torch.zeros(3)), a == fingerprint(torch.zeros(2).double())
    (True, False, False)
    """
    h = hashlib.sha256()
    items = sorted(value.items()) if isinstance(value, Mapping) else [("", value)]
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    """Inverse of :func:`pack`: the value, with arrays as NumPy arrays and floats as Python floats.
    A tree that :func:`pack` cannot have made (another shape, a missing tensor) is a
    :class:`~implicit_diffusion.errors.DataError` naming the offending node."""
    if not (isinstance(tree, (list, tuple)) and len(tree) == 2 and isinstance(tree[0], str)):
        raise DataError(f"malformed packed record {short(tree)}: expected [kind, payload]")
    kind, payload = tree
    if kind in ("tensor", "array", "float", "floats"):
        if not isinstance(payload, str) or payload not in tensors:
            raise DataError(f"packed record names tensor {short(payload)}, which is missing")
        t = tensors[payload]
        if kind == "tensor":
            return t
        if kind == "array":
            if t.dtype == torch.bfloat16:
                raise DataError(f"tensor {payload!r} of a packed record has dtype {t.dtype}, not a NumPy one")
            return t.numpy().copy()
        if t.ndim != (0 if kind == "float" else 1) or not t.is_floating_point():
            raise DataError(f"tensor {payload!r} of a packed record has shape {_shape(t)} ({t.dtype}); "
                            f"expected a {'scalar' if kind == 'float' else 'vector'} of floats")
        return float(t) if kind == "float" else t.tolist()
    if kind == "json":
        return payload
    if kind == "dict":
        if not isinstance(payload, list) or not all(
                isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], (str, int, float, type(None)))
                for e in payload):
            raise DataError(f"malformed packed dict {short(payload)}: expected [[key, record], ...]")
        return {k: unpack(v, tensors) for k, v in payload}
    if kind in ("list", "tuple"):
        if not isinstance(payload, list):
            raise DataError(f"malformed packed {kind} {short(payload)}: expected a list of records")
        items = [unpack(v, tensors) for v in payload]
        return items if kind == "list" else tuple(items)
    raise DataError(f"unknown packed kind {kind!r}")
