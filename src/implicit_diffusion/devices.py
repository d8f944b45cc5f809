"""Devices and precisions by name: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``float32``,
``float64``, ``bfloat16``.

Library code never chooses a device: tensors follow the model's (or the particles') device and
generators are made on it (``torch.Generator(device=...)``). The experiments take a device and
a precision by name from their config, and resolve them here:

- :func:`resolve_device` — ``"auto"`` is CUDA when available (under ``torchrun``, the process's
  ``LOCAL_RANK`` GPU), else the CPU; a named device that is absent is a one-line
  :class:`~implicit_diffusion.errors.ConfigError` naming the ones that are there.
- :func:`resolve_precision` — ``float32`` / ``float64``: parameters and particles in that dtype;
  ``bfloat16``: float32 master weights (parameters, optimizer state, particles and the sampler's
  arithmetic stay float32) with the network's forward under ``torch.autocast`` in bfloat16
  (:class:`Autocast`), the mixed-precision recipe of diffusion training.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["DEVICE_NAMES", "PRECISIONS", "Autocast", "Precision", "available_devices", "check_device_name",
           "generator_on", "resolve_device", "resolve_precision"]

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = ("float32", "float64", "bfloat16")
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def available_devices() -> list[str]:
    """The devices this process can use, by name: ``cpu``, then ``cuda:0`` … and ``mps`` if present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device_name(name: str, key: str = "device") -> None:
    """The syntax only (a config is valid on any machine): ``auto|cpu|cuda|cuda:N|mps``."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise ConfigError(f"config key {key!r}: unknown device {name!r}; allowed: {DEVICE_NAMES}")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``name`` on this machine.

    ``auto``: CUDA if available, else the CPU. ``cuda`` (and ``auto`` on a GPU machine) is the
    process's ``LOCAL_RANK`` GPU under ``torchrun`` and ``cuda:0`` otherwise, so each process of
    a multi-GPU run has its own device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(name, torch.device):
        name = str(name)
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device 'mps' is not available on this machine; "
                              f"available: {', '.join(available_devices())}")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available: this machine has no CUDA GPU "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                          f"available: {', '.join(available_devices())}")
    index = int(name.partition(":")[2] or os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device 'cuda:{index}' is not available; available: {', '.join(available_devices())}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """A precision by name: ``dtype`` of the parameters and particles, and the ``autocast`` dtype
    of the network forwards (None: no autocast)."""

    name: str
    dtype: torch.dtype
    autocast: torch.dtype | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or an :class:`Autocast` of it when this precision autocasts."""
        return model if self.autocast is None else Autocast(model, self.autocast)


def resolve_precision(name: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS,
                      key: str = "dtype") -> Precision:
    """The :class:`Precision` named ``name`` on ``device``; a name outside ``allowed``, float64 on MPS
    (which has none) or bfloat16 on a GPU without it is a one-line ConfigError.

    >>> resolve_precision("bfloat16", torch.device("cpu"))
    Precision(name='bfloat16', dtype=torch.float32, autocast=torch.bfloat16)
    """
    if name not in allowed:
        raise ConfigError(f"config key {key!r}: unknown {name!r}; allowed: {', '.join(allowed)}")
    if name == "float64" and device.type == "mps":
        raise ConfigError("dtype 'float64' is not supported on the 'mps' device; use float32")
    if name == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype 'bfloat16' is not supported on {torch.cuda.get_device_name(device)}; use float32")
        return Precision(name, torch.float32, torch.bfloat16)
    return Precision(name, getattr(torch, name))


class Autocast(nn.Module):
    """``model(x, t)`` with its forward under ``torch.autocast(device, dtype)`` and the output
    cast back to ``x``'s dtype, so the parameters (master weights), the gradients and everything
    the sampler computes from the output stay in ``x``'s precision. Attributes of the wrapped
    model (``prediction``, say) are read through.

    >>> net = Autocast(nn.Linear(2, 2), torch.bfloat16)
    >>> out = net(torch.ones(3, 2))
    >>> out.dtype, next(net.parameters()).dtype
    (torch.float32, torch.float32)
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model
        self.autocast_dtype = dtype

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = self.model(x, *args, **kwargs)
        return out.to(x.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def generator_on(device: torch.device | str, seed: int) -> torch.Generator:
    """``torch.Generator(device=device).manual_seed(seed)``: random numbers drawn where they are used.
    A CUDA generator's stream differs from the CPU's for the same seed."""
    return torch.Generator(device=device).manual_seed(seed)
