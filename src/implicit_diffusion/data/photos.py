"""Random RGB patches of real photographs, offline.

The photographs are the two bundled with scikit-learn (``china.jpg`` and ``flower.jpg``, each
427×640×3 uint8, read by ``sklearn.datasets.load_sample_images()``, no download). Each is first
average-pooled by ``scale`` (non-overlapping ``scale×scale`` blocks; a remainder strip at the
bottom/right is dropped) so that small patches show edges and texture rather than a nearly flat
colour: at the default ``scale=4`` the photos are 106×160 and an 8×8 patch covers 32×32 original
pixels.

Sampling: a patch picks one of the two photos uniformly, then its top-left corner uniformly among
the positions where the whole patch fits, all drawn from the ``generator`` argument.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError

__all__ = ["load_photo_patches"]


@functools.lru_cache(maxsize=4)
def _photos_cached(scale: int) -> Tensor:
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    # np.stack copies: scikit-learn's arrays are read-only, which torch.from_numpy warns about
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(torch.float32)
    if scale > 1:
        x = F.avg_pool2d(x, scale)
    return x / 127.5 - 1.0


def _photos(scale: int = 4) -> Tensor:
    """The two photos average-pooled by ``scale``: float32 ``(2, 3, 427 // scale, 640 // scale)``
    in [−1, 1] (a fresh copy; the decoded photos are cached per ``scale``)."""
    if not isinstance(scale, int) or scale < 1:
        raise DataError(f"scale must be an integer >= 1, got {scale!r}")
    return _photos_cached(scale).clone()


def load_photo_patches(n: int, size: int = 8, *, generator: torch.Generator, scale: int = 4) -> Tensor:
    """``n`` random ``size×size`` RGB patches of scikit-learn's two sample photographs.

    Returns float32 ``(n, 3, size, size)`` with pixels in [−1, 1] (uint8 ``v`` ↦ ``v/127.5 − 1``,
    averaged over ``scale×scale`` blocks first). ``size`` must fit in the pooled photo, i.e.
    ``size <= 427 // scale``. Randomness comes only from ``generator``.

    >>> x = load_photo_patches(5, 8, generator=torch.Generator().manual_seed(0))
    >>> x.shape, bool(x.abs().max() <= 1)
    (torch.Size([5, 3, 8, 8]), True)
    """
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(size, int) or size < 1:
        raise DataError(f"size must be an integer >= 1, got {size!r}")
    if not isinstance(scale, int) or scale < 1:
        raise DataError(f"scale must be an integer >= 1, got {scale!r}")
    photos = _photos_cached(scale)  # read-only use: indexing below copies
    _, _, height, width = photos.shape
    if size > min(height, width):
        raise DataError(
            f"size {size} does not fit in the photos pooled by scale={scale} ({height}×{width}); "
            f"allowed: size <= {min(height, width)}"
        )
    k = torch.randint(0, photos.shape[0], (n,), generator=generator)
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    offsets = torch.arange(size)
    rows = (top[:, None] + offsets)[:, None, :, None]  # (n, 1, size, 1)
    cols = (left[:, None] + offsets)[:, None, None, :]  # (n, 1, 1, size)
    channels = torch.arange(photos.shape[1])[None, :, None, None]  # (1, 3, 1, 1)
    return photos[k[:, None, None, None], channels, rows, cols]  # (n, 3, size, size)
