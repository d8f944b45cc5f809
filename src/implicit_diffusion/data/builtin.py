"""Built-in data sets that need no download.

- 2-D targets: ``"moons"`` and ``"swiss-roll"`` (scikit-learn's generators), ``"rings"`` (two
  concentric circles of radii 1.5 and 3), ``"gaussian-mixture"`` (8 Gaussians on a circle of
  radius 4, sd 0.5); all roughly centred, coordinates within about ±5.
- ``load_digits_images()``: scikit-learn's bundled 1,797 real 8×8 handwritten digits;
  ``load_digits_labels()``: their classes 0..9, in the same order.
- ``train_heldout(name, ...)``: either of them as (train, held-out) rows of points.

Randomness comes from a ``torch.Generator``: scikit-learn's generators receive a seed drawn
from it, so the same generator state gives the same points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TWO_D_DATASETS", "load_digits_images", "load_digits_labels", "train_heldout", "two_d_dataset"]

TWO_D_DATASETS = ("moons", "swiss-roll", "rings", "gaussian-mixture")


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def two_d_dataset(name: str, n: int, *, generator: torch.Generator, noise: float = 0.05) -> Tensor:
    """``n`` points of a 2-D target, float32 of shape ``(n, 2)``, centred, coordinates of order 1–4.

    ``noise`` is the standard deviation of the Gaussian jitter (moons, swiss roll, rings).
    """
    if name not in TWO_D_DATASETS:
        raise ValueError(f"unknown 2-D data set {name!r}; allowed: {', '.join(TWO_D_DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if name == "gaussian-mixture":
        k = torch.randint(0, 8, (n,), generator=generator)
        angle = k.to(torch.float32) * (2 * math.pi / 8)
        centres = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
        return centres + 0.5 * torch.randn(n, 2, generator=generator)
    if name == "rings":
        k = torch.randint(0, 2, (n,), generator=generator).to(torch.float32)
        angle = 2 * math.pi * torch.rand(n, generator=generator)
        radius = (1.0 + k) * 1.5
        pts = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
        return pts + noise * 3 * torch.randn(n, 2, generator=generator)
    from sklearn.datasets import make_moons, make_swiss_roll

    if name == "moons":
        x, _ = make_moons(n, noise=noise, random_state=_seed(generator))
        x = (x - [0.5, 0.25]) * 2.0
    else:
        x, _ = make_swiss_roll(n, noise=noise * 10, random_state=_seed(generator))
        x = x[:, [0, 2]] / 5.0
    return torch.as_tensor(x, dtype=torch.float32)


def load_digits_images() -> Tensor:
    """scikit-learn's bundled digits: float32 ``(1797, 1, 8, 8)`` with pixels scaled to [−1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8), values 0..16
    return torch.as_tensor(images, dtype=torch.float32)[:, None] / 8.0 - 1.0


def load_digits_labels() -> Tensor:
    """The classes of :func:`load_digits_images`' digits, same order: int64 ``(1797,)`` in 0..9.

    >>> y = load_digits_labels()
    >>> tuple(y.shape), y.dtype, y[:5].tolist()
    ((1797,), torch.int64, [0, 1, 2, 3, 4])
    """
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target, dtype=torch.int64)


def train_heldout(name: str, num_train: int, num_heldout: int, *, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(train, held-out) rows of a built-in set: ``num_train`` + ``num_heldout`` points of a 2-D target
    (``(n, 2)``), or, for ``"digits"``, the 1,797 digits flattened to 64 pixels in [−1, 1] and shuffled,
    ``num_heldout`` of them held out and the rest (``num_train`` is ignored) for training.

    >>> train, heldout = train_heldout("digits", 0, 300, generator=torch.Generator().manual_seed(0))
    >>> tuple(train.shape), tuple(heldout.shape)
    ((1497, 64), (300, 64))
    """
    if name == "digits":
        images = load_digits_images().reshape(-1, 64)
        images = images[torch.randperm(images.shape[0], generator=generator)]
        return images[num_heldout:].to(dtype), images[:num_heldout].to(dtype)
    pts = two_d_dataset(name, num_train + num_heldout, generator=generator).to(dtype)
    return pts[:num_train], pts[num_train:]
