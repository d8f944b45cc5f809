"""File-level primitives the library and the run machinery share: atomic writes, tensors as
safetensors, optimizer state as tensors + JSON. Never pickle.

Files are written atomically (a temporary file in the same directory, flushed, then
``os.replace``), so a crash — even SIGKILL — never leaves a half-written file in place of a
good one. A ``torch.optim`` optimizer's ``state_dict()`` is split into its tensors and the
rest (hyperparameters, param groups) as JSON; Python floats survive the JSON round trip
exactly (shortest repr), so a reloaded optimizer is bit-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CrossDeviceResume",
    "atomic_write_text",
    "load_generator_state",
    "load_optimizer_state",
    "optimizer_state",
    "save_tensors",
    "strip_prefix",
    "with_prefix",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a flushed temporary file renamed over it."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _write_atomically(path, write)


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors with safetensors (no pickle), atomically; they are copied to the CPU first."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_atomically(path, lambda tmp: _save_file(save_file, cpu, tmp, metadata=dict(metadata or {}), target=path))


# safetensors reports a failed write as SafetensorError("Error while serializing: I/O error: No space left on
# device (os error 28) at path ..."): the errno is only in the text
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _save_file(save_file: Callable, tensors: dict[str, Tensor], tmp: str, *, metadata: dict[str, str],
               target: str | Path) -> None:
    """``save_file(tensors, tmp)``; an I/O failure inside safetensors becomes the :class:`OSError` it was
    (errno, strerror, and ``target`` as the file name), so a full disk is the usual one-line OS error."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), os.fspath(target)) from e


class CrossDeviceResume(UserWarning):
    """A run saved on one device type continues on another: its random streams were re-seeded."""


def load_generator_state(generator: torch.Generator, state: Tensor, saved_device: str = "cpu") -> None:
    """``generator.set_state(state)`` when ``state`` was saved from a generator of the same device
    type (``saved_device``: ``"cpu"``, ``"cuda"``, ...); else a deterministic re-seed from a hash of
    ``state``, with a :class:`CrossDeviceResume` warning. A generator's stream cannot move between
    device types (a CPU generator's state is a Mersenne Twister, a CUDA one's a seed and an
    offset), so a run resumed on another device goes on with the same law, not the same draws."""
    if saved_device == generator.device.type:
        generator.set_state(state)
        return
    seed = int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:8], "little")
    generator.manual_seed(seed)
    warnings.warn(f"random streams saved on the {saved_device!r} device continue on {generator.device.type!r}: "
                  f"a generator's state cannot move between device types, so they are re-seeded from the "
                  f"saved states (deterministically); the run goes on with the same law, not the same draws",
                  CrossDeviceResume, stacklevel=3)


def with_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``{f"{prefix}{name}": tensor}``: a module's ``state_dict()`` as part of a larger file.

    >>> list(with_prefix({"w": torch.zeros(1)}, "model."))
    ['model.w']
    """
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors named ``prefix…``, with the prefix removed (inverse of :func:`with_prefix`).

    >>> list(strip_prefix({"model.w": torch.zeros(1), "other": torch.zeros(1)}, "model."))
    ['w']
    """
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


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
