"""Images from local files (never the network), as float32 ``(n, C, H, W)`` in [−1, 1].

Formats, recognised from the path:

- **MNIST IDX**: a file named like ``train-images-idx3-ubyte`` (``.gz`` allowed), or a directory
  holding ``train-images-idx3-ubyte[.gz]`` (also the ``train-images.idx3-ubyte`` spelling).
- **NumPy arrays**: a ``.npz`` file (first present of the keys ``x_train``, ``images``, ``x``,
  ``data``, ``arr_0``) or a ``.npy`` file, holding ``(n, H, W)`` grayscale, ``(n, H, W, C)`` or
  ``(n, C, H, W)`` with ``C`` in {1, 3} (channels-last when the last axis is 1 or 3 and axis 1 is
  not). Always read with ``allow_pickle=False``: object arrays are refused, never unpickled.
- **CIFAR-10 python batches**: a ``cifar-10-batches-py`` directory (or one containing it) with
  ``data_batch_1`` … ``data_batch_5``. These are pickles, which can run code when loaded, so they
  are refused unless ``trust_pickle=True``.
- **An image folder**: ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.gif`` files found recursively, in
  sorted path order, read with Pillow: grayscale (C=1) if every image is mode ``L``, else RGB.

Pixel scaling: integer pixels must lie in 0..255 and map by ``v/127.5 − 1`` (255 ↦ 1, 0 ↦ −1);
float arrays are taken as [0, 1] if their maximum is ≤ 1, else as [0, 255]. Every failure
(absent path, unknown format, malformed or refused file) raises
:class:`~implicit_diffusion.errors.DataError` naming the path.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError

__all__ = ["IMAGE_SUFFIXES", "NPZ_KEYS", "SUPPORTED_FORMATS", "load_image_data"]

NPZ_KEYS = ("x_train", "images", "x", "data", "arr_0")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SUPPORTED_FORMATS = (
    "an MNIST IDX file (train-images-idx3-ubyte[.gz]) or a directory holding one",
    f"a .npz file (key {', '.join(NPZ_KEYS)}) or a .npy file",
    "a CIFAR-10 python batches directory (cifar-10-batches-py, needs trust_pickle)",
    f"a directory of images ({', '.join(IMAGE_SUFFIXES)})",
)
_IDX_NAME = re.compile(r"[.-]idx\d-ubyte$")
_IDX_IMAGES_MAGIC = 0x00000803  # uint8 (0x08) data with 3 dimensions


def load_image_data(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    size: int | None = None,
    limit: int | None = None,
) -> Tensor:
    """Read the images at ``path``: float32 ``(n, C, H, W)`` in [−1, 1] (formats: module docstring).

    ``limit`` keeps only the first ``limit`` images; ``size`` resizes every image to
    ``size×size`` (bilinear, antialiased; Pillow for image folders, so they may mix sizes).

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     np.savez(f"{d}/m.npz", x_train=np.full((2, 28, 28), 255, np.uint8))
    ...     x = load_image_data(f"{d}/m.npz")
    >>> x.shape, float(x.max())
    (torch.Size([2, 1, 28, 28]), 1.0)
    """
    for name, value in (("size", size), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be None or an integer >= 1, got {value!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or directory: {p}")
    if p.is_file():
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if _IDX_NAME.search(name):
            arr = _read_idx(p, limit)
        elif p.suffix.lower() in (".npz", ".npy"):
            arr = _read_numpy(p, limit)
        else:
            raise DataError(f"unsupported data file {p}; supported: {'; '.join(SUPPORTED_FORMATS)}")
    elif (idx := _find_idx(p)) is not None:
        arr = _read_idx(idx, limit)
    elif (cifar := _find_cifar(p)) is not None:
        arr = _read_cifar(cifar, trust_pickle, limit)
    else:
        return _read_folder(p, size, limit)
    x = _scale(arr, p)
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x


def _find_idx(directory: Path) -> Path | None:
    for stem in ("train-images-idx3-ubyte", "train-images.idx3-ubyte"):
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _find_cifar(directory: Path) -> Path | None:
    for d in (directory, directory / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            return d
    return None


def _read_idx(file: Path, limit: int | None) -> np.ndarray:
    """An IDX uint8 3-D images file → uint8 ``(n, 1, H, W)``."""
    try:
        raw = gzip.decompress(file.read_bytes()) if file.name.endswith(".gz") else file.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{file}: cannot read the IDX file ({e})") from e
    if len(raw) < 16:
        raise DataError(f"{file}: truncated IDX file ({len(raw)} bytes, shorter than its 16-byte header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(
            f"{file}: bad IDX magic number 0x{magic:08x}; expected 0x{_IDX_IMAGES_MAGIC:08x} "
            "(uint8 3-D images, as in train-images-idx3-ubyte)"
        )
    n, h, w = struct.unpack(">III", raw[4:16])
    expected, got = n * h * w, len(raw) - 16
    if got != expected:
        what = "truncated" if got < expected else "oversized"
        raise DataError(
            f"{file}: {what} IDX file: header says {n}×{h}×{w} = {expected} pixel bytes, file holds {got}"
        )
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)[:limit]


def _read_numpy(file: Path, limit: int | None) -> np.ndarray:
    """A ``.npz``/``.npy`` file → its image array in ``(n, C, H, W)`` layout (dtype unchanged)."""
    key = None
    try:
        # our own handle: np.load leaks the one it opens when the zip is malformed
        with open(file, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arr = loaded
            else:
                with loaded:
                    key = next((k for k in NPZ_KEYS if k in loaded.files), None)
                    if key is None:
                        present = ", ".join(loaded.files) or "none"
                        raise DataError(
                            f"{file}: no image array; expected one of the keys {', '.join(NPZ_KEYS)}, found: {present}"
                        )
                    arr = loaded[key]
    except DataError:
        raise
    except ValueError as e:  # numpy refuses object arrays / pickled data when allow_pickle=False
        where = f"array {key!r}" if key else "the file"
        raise DataError(
            f"{file}: {where} holds pickled Python objects, refused (allow_pickle=False); "
            "expected a numeric image array"
        ) from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{file}: not a readable NumPy file ({e})") from e
    if arr.dtype.kind not in "uif":
        raise DataError(f"{file}: image array has dtype {arr.dtype}; expected unsigned/signed integers or floats")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise DataError(
            f"{file}: image array has shape {arr.shape}; "
            "expected (n, H, W), (n, H, W, C) or (n, C, H, W) with C in 1 or 3"
        )
    return arr[:limit]


def _read_cifar(directory: Path, trust_pickle: bool, limit: int | None) -> np.ndarray:
    """CIFAR-10 ``data_batch_*`` pickles → uint8 ``(n, 3, 32, 32)``."""
    if not trust_pickle:
        raise DataError(
            f"{directory}: the CIFAR-10 python batches are pickle files, which can execute code when loaded; "
            "pass --trust-pickle (trust_pickle=True) only for files from a trusted source"
        )
    warnings.warn(
        f"unpickling the CIFAR-10 batches in {directory}: pickle files can execute arbitrary code",
        UserWarning,
        stacklevel=3,
    )
    files = sorted(directory.glob("data_batch_*"), key=lambda f: (len(f.name), f.name))
    parts: list[np.ndarray] = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
        except Exception as e:  # unpickling can fail in many ways (EOF, bad opcode, missing class…)
            raise DataError(f"{f}: cannot unpickle the CIFAR-10 batch ({type(e).__name__}: {e})") from e
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise DataError(f"{f}: not a CIFAR-10 batch; expected a dict with b'data' a uint8 (n, 3072) array")
        parts.append(data.reshape(-1, 3, 32, 32))
        if limit is not None and sum(len(a) for a in parts) >= limit:
            break
    return np.concatenate(parts)[:limit]


def _read_folder(directory: Path, size: int | None, limit: int | None) -> Tensor:
    """A directory of image files → float32 ``(n, C, H, W)`` in [−1, 1]."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in directory.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"no images found under {directory}; supported: {'; '.join(SUPPORTED_FORMATS)}")
    files = files[:limit]
    errors = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
    modes, first_size = [], None
    for f in files:  # header pass: Image.open reads mode and size without decoding pixels
        try:
            with Image.open(f) as im:
                modes.append(im.mode)
                if size is None and first_size is None:
                    first_size = im.size
                elif size is None and im.size != first_size:
                    raise DataError(
                        f"{f}: image size {im.size[0]}×{im.size[1]} differs from {files[0]} "
                        f"({first_size[0]}×{first_size[1]}); pass size=N to resize all to N×N"
                    )
        except DataError:
            raise
        except errors as e:
            raise DataError(f"{f}: cannot read the image ({e})") from e
    gray = all(m == "L" for m in modes)
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if gray else "RGB")
                if size is not None:
                    im = im.resize((size, size), bilinear)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except errors as e:
            raise DataError(f"{f}: cannot read the image ({e})") from e
    arr = np.stack(arrays)  # (n, H, W) or (n, H, W, 3)
    arr = arr[:, None] if gray else arr.transpose(0, 3, 1, 2)
    return _scale(arr, directory)


def _scale(arr: np.ndarray, path: Path) -> Tensor:
    """Pixels (integers in 0..255, or floats in [0, 1] or [0, 255]) → float32 in [−1, 1]."""
    if arr.shape[0] == 0 or arr.size == 0:
        raise DataError(f"{path}: holds no images (array shape {arr.shape})")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # a copy, C-contiguous
    if arr.dtype == np.uint8:
        return x / 127.5 - 1.0
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise DataError(
            f"{path}: pixel values span [{lo}, {hi}]; expected integers in 0..255 or floats in [0, 1] or [0, 255]"
        )
    if arr.dtype.kind == "f" and hi <= 1.0:
        return x * 2.0 - 1.0
    return x / 127.5 - 1.0
