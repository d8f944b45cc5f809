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

Headers are read first and what they claim (an IDX header's n×H×W, a ``.npy`` header's shape and
dtype, a zip directory's sizes, an image's pixel count against Pillow's ``MAX_IMAGE_PIXELS``) is
checked against the file before anything of that size is allocated.

Pixel scaling: integer pixels must lie in 0..255 and map by ``v/127.5 − 1`` (255 ↦ 1, 0 ↦ −1);
float arrays are taken as [0, 1] if their maximum is ≤ 1, else as [0, 255]. Every failure
(absent path, unknown format, malformed or refused file) raises
:class:`~implicit_diffusion.errors.DataError` naming the path.
"""

from __future__ import annotations

import gzip
import math
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
    """An IDX uint8 3-D images file → uint8 ``(n, 1, H, W)``.

    The 16-byte header is read first and its claim (n·H·W pixel bytes) compared with the file's size
    (``.gz``: with what the stream decompresses to, read in chunks and never past the claim), so a
    header claiming terabytes is refused before anything that large is allocated."""
    gz = file.name.endswith(".gz")
    try:
        with (gzip.open(file, "rb") if gz else open(file, "rb")) as fh:
            header = fh.read(16)
            if len(header) < 16:
                raise DataError(
                    f"{file}: truncated IDX file ({len(header)} bytes, shorter than its 16-byte header)")
            (magic,) = struct.unpack(">I", header[:4])
            if magic != _IDX_IMAGES_MAGIC:
                raise DataError(
                    f"{file}: bad IDX magic number 0x{magic:08x}; expected 0x{_IDX_IMAGES_MAGIC:08x} "
                    "(uint8 3-D images, as in train-images-idx3-ubyte)"
                )
            n, h, w = struct.unpack(">III", header[4:16])
            expected = n * h * w
            if gz:  # chunks: a claim of 2**96 bytes is never allocated, a gzip bomb stops at the claim + 1 MiB
                chunks, got = [], 0
                while got <= expected and (chunk := fh.read(1 << 20)):
                    chunks.append(chunk)
                    got += len(chunk)
                raw = b"".join(chunks)
            else:
                got = file.stat().st_size - 16
                raw = fh.read(expected) if got == expected else b""
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{file}: cannot read the IDX file ({e})") from e
    if got != expected:
        what = "truncated" if got < expected else "oversized"
        more = "at least " if gz and got > expected else ""
        raise DataError(
            f"{file}: {what} IDX file: header says {n}×{h}×{w} = {expected} pixel bytes"
            f"{f' ({_nbytes(expected)})' if expected >= 1 << 20 else ''}, file holds {more}{got}"
        )
    return np.frombuffer(raw, np.uint8).reshape(n, 1, h, w)[:limit]


def _read_numpy(file: Path, limit: int | None) -> np.ndarray:
    """A ``.npz``/``.npy`` file → its image array in ``(n, C, H, W)`` layout (dtype unchanged).

    The ``.npy`` header (of the file, or of the ``.npz`` member) is read first: its dtype, its shape
    and the bytes they claim are checked against the file (or member) before the data are read, so a
    200-byte file claiming terabytes is a one-line :class:`DataError`, not a failed allocation."""
    if file.suffix.lower() == ".npy":
        try:
            with open(file, "rb") as fh:
                return _read_npy(fh, file.stat().st_size, file, f"{file}", "the file", limit)
        except OSError as e:
            raise DataError(f"{file}: cannot read the file ({e})") from e
    if not zipfile.is_zipfile(file):
        raise DataError(f"{file} is not a .npz (zip) archive; expected a file written by np.savez")
    try:
        with zipfile.ZipFile(file) as zf:
            members = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in zf.infolist()}
            key = next((k for k in NPZ_KEYS if k in members), None)
            if key is None:
                present = ", ".join(members) or "none"
                raise DataError(
                    f"{file}: no image array; expected one of the keys {', '.join(NPZ_KEYS)}, found: {present}"
                )
            info = members[key]
            where = f"{file} (array {key!r})"
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DataError(f"{where}: compression method {info.compress_type}; expected stored or deflated "
                                "(np.savez or np.savez_compressed)")
            # deflate expands at most ~1032:1, so a larger claim in the zip directory is a lie (or a bomb)
            bound = info.compress_size if info.compress_type == zipfile.ZIP_STORED else 1032 * info.compress_size
            if info.file_size > bound + 64:
                raise DataError(f"{where}: the zip directory claims {_nbytes(info.file_size)} uncompressed "
                                f"from {info.compress_size} compressed bytes (at most {_nbytes(bound)}); "
                                "the archive is corrupted")
            with zf.open(info) as fh:
                return _read_npy(fh, info.file_size, file, where, f"array {key!r}", limit)
    except DataError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
        raise DataError(f"{file}: not a readable .npz archive ({e})") from e


def _read_npy(fh, size: int, file: Path, label: str, what: str, limit: int | None) -> np.ndarray:
    """The ``.npy`` stream ``fh`` of ``size`` bytes (``label`` names it in errors) → ``(n, C, H, W)``."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fh)
    except ValueError:
        raise DataError(f"{label} is not a .npy file (no NumPy magic bytes); expected a file written by np.save")
    try:
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(fh)
        elif version == (3, 0):  # utf-8 field names; numpy has no public reader for it
            shape, fortran, dtype = npy._read_array_header(fh, version)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]}; allowed 1.0, 2.0, 3.0")
    except ValueError as e:
        raise DataError(f"{label}: malformed .npy header ({' '.join(str(e).split())[:200]})") from None
    if any(d < 0 for d in shape):  # numpy's header reader checks only that they are integers
        raise DataError(f"{label}: malformed .npy header (shape {shape} has a negative dimension)")
    if dtype.hasobject:
        raise DataError(
            f"{file}: {what} holds pickled Python objects, refused (allow_pickle=False); "
            "expected a numeric image array"
        )
    if dtype.kind not in "uif" or dtype.subdtype is not None:
        raise DataError(f"{file}: image array has dtype {dtype}; expected unsigned/signed integers or floats")
    layout = _layout(shape, file)
    claimed = math.prod(shape) * dtype.itemsize
    available = size - fh.tell()
    if claimed > available:
        holder = "the file" if what == "the file" else "the member"
        raise DataError(f"{label} is truncated: its header claims {shape} {dtype.name} = {_nbytes(claimed)}, "
                        f"{holder} has {_nbytes(size)} ({_nbytes(max(available, 0))} after the header)")
    # C order: only the first `limit` images are read; Fortran order is stored transposed, read whole
    n = shape[0] if fortran or limit is None else min(shape[0], limit)
    rows = math.prod(shape[1:])
    arr = np.empty(n * rows, dtype)
    view = memoryview(arr.view(np.uint8))
    got = 0
    while got < len(view) and (k := fh.readinto(view[got:])):
        got += k
    if got < len(view):
        raise DataError(f"{label} is truncated: the data end after {got} of {_nbytes(len(view))}")
    arr = arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape((n, *shape[1:]))
    if layout == "hw":
        arr = arr[:, None]
    elif layout == "hwc":
        arr = arr.transpose(0, 3, 1, 2)
    return arr[:limit]


def _layout(shape: tuple[int, ...], file: Path) -> str:
    """``"hw"`` (grayscale ``(n, H, W)``), ``"hwc"`` (channels last) or ``"chw"``; else a DataError."""
    if len(shape) == 3:
        return "hw"
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "hwc"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "chw"
    raise DataError(
        f"{file}: image array has shape {shape}; "
        "expected (n, H, W), (n, H, W, C) or (n, C, H, W) with C in 1 or 3"
    )


def _nbytes(n: int) -> str:
    """``63771674411008`` → ``"58 TiB"``; below 1 KiB, ``"200 bytes"``."""
    for unit, size in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                       ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


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
    from PIL import Image

    files = sorted(f for f in directory.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"no images found under {directory}; supported: {'; '.join(SUPPORTED_FORMATS)}")
    files = files[:limit]
    with warnings.catch_warnings():
        # an image whose header claims more than Pillow's MAX_IMAGE_PIXELS is refused, not decoded
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _read_images(files, directory, size)


def _read_images(files: list[Path], directory: Path, size: int | None) -> Tensor:
    """Two passes over ``files``: headers (modes, sizes), then pixels."""
    from PIL import Image, UnidentifiedImageError

    errors = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)
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
