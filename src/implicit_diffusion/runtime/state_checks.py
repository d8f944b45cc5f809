"""Does a saved run state fit the live objects it is about to be loaded into?

:func:`check_state_of` compares ``(tensors, meta)`` as :func:`~.state.state_of` makes them with the
live parts of a run (modules, optimizers, schedulers, generators, recorders) and
:func:`check_like` compares a restored result record with what the live run makes, so that a
checkpoint with the right format tag but the wrong contents is a one-line
:class:`~implicit_diffusion.errors.DataError` ("checkpoint PATH: tensor 'theta' has shape (3,), the
run's is (6,)") before anything is loaded, instead of a ``KeyError`` or a shape mismatch deep
inside ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..serialization import strip_prefix
from .validation import short

__all__ = ["check_like", "check_state_of"]


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _has_state(obj: Any) -> bool:
    return hasattr(obj, "state") and hasattr(obj, "load_state")


def _claims(parts: Mapping[str, Any], prefix: str, name: str) -> str | None:
    """The part a tensor named ``name`` belongs to (the longest matching part name), or None."""
    best = None
    for part_name, part in parts.items():
        full = prefix + part_name
        if part is None:
            continue
        exact = isinstance(part, torch.Generator) or _has_state(part)
        if (name == full and exact) or name.startswith(full + "."):
            if best is None or len(part_name) > len(best):
                best = part_name
    return best


def _same(source: str, name: str, saved: Tensor, live: Tensor) -> None:
    if tuple(saved.shape) != tuple(live.shape):
        raise DataError(f"{source}: tensor {name!r} has shape {_shape(saved)}, the run's is {_shape(live)}")
    if saved.dtype != live.dtype:
        raise DataError(f"{source}: tensor {name!r} has dtype {saved.dtype}, the run's is {live.dtype}")


def _check_module(source: str, full: str, module: torch.nn.Module, tensors: Mapping[str, Tensor]) -> None:
    live = module.state_dict()
    saved = strip_prefix(tensors, f"{full}.")
    for key, value in live.items():
        if key not in saved:
            raise DataError(f"{source}: tensor {full + '.' + key!r} is missing")
        _same(source, f"{full}.{key}", saved[key], value)


def _check_optimizer(source: str, name: str, full: str, optimizer: torch.optim.Optimizer,
                     tensors: Mapping[str, Tensor], meta: Any) -> None:
    """The saved state of ``optimizer`` (:func:`~implicit_diffusion.serialization.optimizer_state`):
    its groups have the live groups' sizes, and each tensor ``{full}.{i}.{key}`` has parameter i's
    shape and dtype, or is a scalar (Adam's step)."""
    if not isinstance(meta, Mapping) or not all(k in meta for k in ("param_groups", "state", "tensor_keys")):
        raise DataError(f"{source}: meta {name!r} must be an optimizer's record (param_groups, state, "
                        f"tensor_keys), got {_kind(meta)}")
    groups, keys = meta["param_groups"], meta["tensor_keys"]
    live_groups = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(live_groups) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) and len(g["params"]) == len(lg["params"])
            for g, lg in zip(groups, live_groups)):
        sizes = [len(g["params"]) for g in live_groups]
        raise DataError(f"{source}: meta {name!r} must hold {len(live_groups)} parameter group(s) of sizes "
                        f"{sizes}, as the run's optimizer")
    for i, (saved_group, live_group) in enumerate(zip(groups, live_groups)):
        _same_skeleton(source, f"{name}.param_groups.{i}", {k: v for k, v in saved_group.items() if k != "params"},
                       {k: v for k, v in live_group.items() if k != "params"})
    if not isinstance(meta["state"], Mapping) or not isinstance(keys, list) \
            or not all(isinstance(k, str) for k in keys):
        raise DataError(f"{source}: meta {name!r} has a malformed state record")
    params = [p for g in live_groups for p in g["params"]]
    saved = {k for k in tensors if k.startswith(f"{full}.")}
    for k in sorted(set(keys) - saved):
        raise DataError(f"{source}: tensor {k!r} is missing")
    for k in sorted(saved - set(keys)):
        raise DataError(f"{source}: unexpected tensor {k!r} (the optimizer's record does not list it)")
    per_param: dict[int, set[str]] = {}
    expected = _state_keys(optimizer)  # entry -> whether it is a scalar (Adam's step) or shaped like its parameter
    for k in keys:
        index, _, key = k[len(full) + 1:].partition(".")
        if not (index.isdigit() and int(index) < len(params) and key):
            raise DataError(f"{source}: tensor {k!r} names no parameter of the run's optimizer "
                            f"({len(params)} parameters)")
        p, t = params[int(index)], tensors[k]
        per_param.setdefault(int(index), set()).add(key)
        scalar = expected[key] if expected is not None and key in expected else t.ndim == 0
        if scalar:
            if t.ndim != 0 or not (t.is_floating_point() or t.dtype == torch.int64):
                raise DataError(f"{source}: tensor {k!r} has shape {_shape(t)} ({t.dtype}); the optimizer keeps a "
                                f"scalar there")
        else:
            _same(source, k, t, p)
    for index, entries in meta["state"].items():
        if not (isinstance(index, str) and index.isdigit() and int(index) < len(params)) \
                or not isinstance(entries, Mapping):
            raise DataError(f"{source}: meta {name!r} has state for parameter {index!r}; the run's optimizer "
                            f"has {len(params)}")
    for index, entries in meta["state"].items():
        per_param.setdefault(int(index), set()).update(entries)
    for index, keys_here in sorted(per_param.items()):
        if expected is not None and keys_here != set(expected):
            raise DataError(f"{source}: the optimizer state {name!r} is incomplete: parameter {index} has "
                            f"{', '.join(sorted(keys_here)) or 'nothing'}; a {type(optimizer).__name__} step leaves "
                            f"{', '.join(sorted(expected))}")


def _state_keys(optimizer: torch.optim.Optimizer) -> dict[str, bool] | None:
    """The entries one step of ``optimizer``'s class and settings (its first group's) leaves per parameter,
    each with whether it is a scalar tensor (else it has its parameter's shape), found by stepping a
    copy on a one-element parameter; None when that cannot be done here."""
    group = optimizer.param_groups[0]
    p = group["params"][0] if group["params"] else None
    if p is None:
        return None
    dummy = torch.zeros(1, dtype=p.dtype, requires_grad=True)
    dummy.grad = torch.zeros_like(dummy)
    try:
        probe = type(optimizer)([{**{k: v for k, v in group.items() if k != "params"}, "params": [dummy]}])
        probe.step()
    except Exception:  # e.g. a fused optimizer that needs a GPU: the other checks still hold
        return None
    return {k: isinstance(v, Tensor) and v.ndim == 0 for k, v in probe.state[dummy].items()}


def _kind(value: Any) -> str:
    """A JSON value's type, for messages: "an integer", "a string", "null", ..."""
    return {"NoneType": "null", "bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string",
            "list": "a list", "dict": "an object"}.get(_category(value), f"a {type(value).__name__}")


def _category(value: Any) -> str:
    if value is None or isinstance(value, (bool, str)):
        return type(value).__name__
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    return "dict" if isinstance(value, Mapping) else type(value).__name__


def _fits(saved: Any, live: Any) -> bool:
    """Whether ``saved`` has the JSON type of ``live`` (an integer passes for a float, a list for a tuple)."""
    want, got = _category(live), _category(saved)
    return got == want or (want == "float" and got == "int")


def _same_skeleton(source: str, where: str, saved: Any, live: Any, deep: bool = True) -> None:
    """``saved`` has ``live``'s JSON skeleton: the same keys, lists of the same lengths (``deep``), and
    values of the same types, so nothing read from it fails later in the run."""
    if not _fits(saved, live):
        raise DataError(f"{source}: meta {where!r} must be {_kind(live)}, got {_kind(saved)}")
    if isinstance(live, Mapping):
        if set(saved) != set(live):
            missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
            raise DataError(f"{source}: meta {where!r} must have the keys {', '.join(map(str, sorted(live)))}"
                            + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
                            + (f" (unexpected: {short(extra)})" if extra else ""))
        for key, value in live.items():
            if deep:
                _same_skeleton(source, f"{where}.{key}", saved[key], value)
            elif not _fits(saved[key], value):
                raise DataError(f"{source}: meta '{where}.{key}' must be {_kind(value)}, got {_kind(saved[key])}")
    elif deep and isinstance(live, (list, tuple)):
        if len(saved) != len(live):
            raise DataError(f"{source}: meta {where!r} must have {len(live)} entries, got {len(saved)}")
        for i, (a, b) in enumerate(zip(saved, live)):
            _same_skeleton(source, f"{where}.{i}", a, b)


def check_state_of(parts: Mapping[str, Any], tensors: Mapping[str, Tensor], meta: Any, prefix: str = "", *,
                   like: Mapping[str, Tensor | None] | None = None, source: str = "checkpoint",
                   exhaustive: bool = True) -> None:
    """Raise a one-line :class:`~implicit_diffusion.errors.DataError` unless ``(tensors, meta)`` (as
    :func:`state_of` makes them, with the same ``prefix``) fit the live ``parts``: module tensors
    by name, shape and dtype; optimizer state by its parameters' shapes and dtypes; a generator's
    state by the live one's size (when saved on the same device type); a scheduler's record by
    its keys; each part's JSON record present and of the right kind.

    ``like``: other tensors under ``prefix`` the caller reads itself (full names), each with a live
    tensor of the shape and dtype it must have, or None (optional, any shape). ``exhaustive``: no
    tensor under ``prefix`` may be left unclaimed. ``source`` starts every message
    (``"checkpoint 'PATH'"``).
    """
    like = dict(like or {})
    if not isinstance(meta, Mapping):
        raise DataError(f"{source}: the saved state must be a JSON object, got {_kind(meta)}")
    for name, part in parts.items():
        full = prefix + name
        if part is None or isinstance(part, torch.nn.Module):
            continue
        if name not in meta and not isinstance(part, torch.Generator):  # a generator's: since devices were saved
            raise DataError(f"{source}: meta {name!r} is missing")
        record = meta.get(name, {"device": "cpu"})
        if isinstance(part, torch.optim.Optimizer):
            _check_optimizer(source, name, full, part, tensors, record)
        elif _is_scheduler(part):
            live = part.state_dict()
            if not isinstance(record, Mapping) or set(record) != set(live):
                raise DataError(f"{source}: meta {name!r} must be the learning-rate scheduler's record with keys "
                                f"{', '.join(sorted(live))}; got {_kind(record)}"
                                + (f" with keys {short(sorted(map(str, record)))}" if isinstance(record, Mapping)
                                   else ""))
            if not isinstance(record.get("last_epoch"), int) or isinstance(record["last_epoch"], bool):
                raise DataError(f"{source}: meta '{name}.last_epoch' must be an integer, "
                                f"got {record.get('last_epoch')!r}")
            _same_skeleton(source, name, record, live)
        elif isinstance(part, torch.Generator):
            if not (isinstance(record, Mapping) and isinstance(record.get("device", "cpu"), str)):
                raise DataError(f"{source}: meta {name!r} must be a generator's record ({{'device': TYPE}}), "
                                f"got {_kind(record)}")
            if full not in tensors:
                raise DataError(f"{source}: tensor {full!r} is missing")
            saved, device = tensors[full], record.get("device", "cpu")
            if device == part.device.type:
                live = part.get_state()
                if tuple(saved.shape) != tuple(live.shape) or saved.dtype != live.dtype:
                    raise DataError(f"{source}: tensor {full!r} is not the state of a {device} random generator "
                                    f"(shape {_shape(saved)}, {saved.dtype}; expected {_shape(live)}, {live.dtype})")
            elif saved.dtype != torch.uint8 or saved.ndim != 1:  # re-seeded from a hash: any length
                raise DataError(f"{source}: tensor {full!r} is not a random generator's state (shape "
                                f"{_shape(saved)}, {saved.dtype}; expected a uint8 vector)")
        elif _has_state(part):
            if not isinstance(record, Mapping):
                raise DataError(f"{source}: meta {name!r} must be a JSON object, got {_kind(record)}")
    for name, part in parts.items():  # the tensors, after the records: a module has none
        full = prefix + name
        if isinstance(part, torch.nn.Module):
            _check_module(source, full, part, tensors)
        elif part is not None and _has_state(part) and not isinstance(part, (torch.optim.Optimizer, torch.Generator)):
            live, live_record = part.state(full)  # what it holds now; lengths grow as the run goes on, names stay
            _same_skeleton(source, name, meta[name], live_record, deep=False)
            for key in live:
                if key not in tensors:
                    raise DataError(f"{source}: tensor {key!r} is missing")
    for key, value in like.items():
        if key not in tensors:
            if value is None:
                continue
            raise DataError(f"{source}: tensor {key!r} is missing")
        if value is not None:
            _same(source, key, tensors[key], value)
    if exhaustive:
        entries = {name: set(part.state_dict()) for name, part in parts.items() if isinstance(part, torch.nn.Module)}
        for key in sorted(k for k in tensors if k.startswith(prefix) and k not in like):
            owner = _claims(parts, prefix, key)
            if owner is None:
                raise DataError(f"{source}: unexpected tensor {key!r} (the run has no such state)")
            if owner in entries and key[len(prefix + owner) + 1:] not in entries[owner]:
                raise DataError(f"{source}: unexpected tensor {key!r} (the run's {owner!r} has no such entry)")


def check_like(source: str, where: str, value: Any, example: Any) -> None:
    """A restored result record ``value`` (unpacked: arrays, tensors, numbers, lists, tuples, dicts) is shaped
    like ``example``, what the live run makes now: arrays and tensors of the same shape and dtype,
    numbers for numbers, sequences of the same length, dicts with the same keys; else a one-line
    DataError naming ``where``."""
    if isinstance(example, (np.ndarray, Tensor)):
        if type(value) is not type(example) or tuple(value.shape) != tuple(example.shape) \
                or value.dtype != example.dtype:
            got = (f"{type(value).__name__} of shape {tuple(value.shape)}, {value.dtype}"
                   if isinstance(value, (np.ndarray, Tensor)) else _kind(value))
            raise DataError(f"{source}: {where} must be an array of shape {tuple(example.shape)} ({example.dtype}), "
                            f"got {got}")
    elif isinstance(example, (list, tuple, Mapping)):
        if _category(value) != _category(example) or len(value) != len(example):
            raise DataError(f"{source}: {where} must be {_kind(example)} of {len(example)} entries, got "
                            + (f"{_kind(value)} of {len(value)}" if isinstance(value, (list, tuple, Mapping))
                               else _kind(value)))
        if isinstance(example, Mapping):
            if set(value) != set(example):
                raise DataError(f"{source}: {where} must have the keys {', '.join(map(str, example))}")
            for key in example:
                check_like(source, f"{where}.{key}", value[key], example[key])
        else:
            for i, (a, b) in enumerate(zip(value, example)):
                check_like(source, f"{where}.{i}", a, b)
    elif not _fits(value, example):
        raise DataError(f"{source}: {where} must be {_kind(example)}, got {_kind(value)}")
