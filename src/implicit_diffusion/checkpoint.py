"""Checkpoint files: tensors in safetensors, everything else as JSON in its header. Never pickle.

A checkpoint is one ``.safetensors`` file whose header metadata holds ``format``, ``version``
and ``meta`` (a JSON document: step counter, experiment name, resolved config, optimizer
hyperparameters, ...). It is written to a temporary file beside the target, flushed to disk
and renamed over it, so a crash (even SIGKILL) during the write leaves the previous checkpoint
intact and loadable.

Helpers turn the state a run needs into tensors + JSON and back:

- a ``torch.Generator``'s state is a uint8 tensor (``get_state``/``set_state``);
- a ``torch.optim`` optimizer's ``state_dict()`` is split into its tensors (``{prefix}.{i}.{key}``)
  and the rest (hyperparameters, param groups) as JSON; Python floats survive the JSON round
  trip exactly (shortest repr), so a resumed optimizer is bit-identical;
- a learning-rate scheduler's ``state_dict()`` is JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError
from .runio import save_tensors

__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "implicit-diffusion/checkpoint"
_VERSION = "1"


def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-ready ``meta`` to ``path`` atomically (temporary file + rename)."""
    header = {"format": CHECKPOINT_FORMAT, "version": _VERSION, "meta": json.dumps(meta, allow_nan=False)}
    save_tensors(path, tensors, header)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from a checkpoint; a missing, truncated or foreign file is a one-line
    :class:`~implicit_diffusion.errors.DataError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != CHECKPOINT_FORMAT:
                raise DataError(f"{str(path)!r} is not an implicit-diffusion checkpoint "
                                f"(format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
            if header.get("version") != _VERSION:
                raise DataError(f"checkpoint {str(path)!r} has version {header.get('version')!r}; "
                                f"this release reads version {_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"checkpoint {str(path)!r} cannot be read (truncated or corrupted?): "
                        f"{' '.join(str(e).split())}") from None
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise DataError(f"checkpoint {str(path)!r} has a malformed metadata record: {e}") from None
    return tensors, meta


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors named ``{prefix}.{param index}.{key}`` and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain,
                     "tensor_keys": sorted(tensors)}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: dict,
                         prefix: str = "optimizer") -> None:
    """Inverse of :func:`optimizer_state`: load the saved state into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name in meta["tensor_keys"]:
        index, key = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(index), {})[key] = tensors[name]
    for index, entries in meta["state"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists: give them back the optimizer's own types
    groups = [{k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}
              for saved, current in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
