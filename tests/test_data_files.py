"""Local image files: every format round-trips its pixels exactly, every bad input is a DataError.

Arrays are random uint8 with a 0 and a 255 planted at known places, compared to an independent
float64 ``v/127.5 − 1``: a transposed layout, a swapped channel order or a flipped scale fails.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch

from implicit_diffusion.data import SUPPORTED_FORMATS, load_image_data
from implicit_diffusion.errors import DataError, ImplicitDiffusionError


def _pixels(*shape: int, seed: int = 0) -> np.ndarray:
    """Random uint8 of ``shape`` with 0 at the first and 255 at the last position."""
    a = np.random.default_rng(seed).integers(1, 255, size=shape, dtype=np.uint8)
    a.flat[0], a.flat[-1] = 0, 255
    return a


def _expected(a: np.ndarray) -> torch.Tensor:
    """An (n, C, H, W) uint8 array as the loader should return it, in float64."""
    return torch.from_numpy(a.astype(np.float64) / 127.5 - 1.0)


def _check(x: torch.Tensor, a: np.ndarray) -> None:
    assert x.dtype == torch.float32 and x.shape == a.shape and x.is_contiguous()
    assert float((x.double() - _expected(a)).abs().max()) <= 1e-6
    t = torch.from_numpy(a)
    assert (x[t == 0] == -1.0).all() and (x[t == 255] == 1.0).all()  # exactly


def _idx(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.tobytes()


class _Trap:
    """Unpickling this touches ``marker``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# --- MNIST IDX ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("as_dir", [False, True])
def test_idx_round_trip(tmp_path, gz, as_dir):
    a = _pixels(3, 28, 28)
    raw = _idx(a)
    f = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(gzip.compress(raw) if gz else raw)
    _check(load_image_data(tmp_path if as_dir else f), a[:, None])
    _check(load_image_data(f, limit=2), a[:2, None])


def test_idx_non_square_images_keep_rows_and_columns(tmp_path):
    a = _pixels(2, 5, 7)  # height 5, width 7: swapping them changes the result
    (tmp_path / "x-idx3-ubyte").write_bytes(_idx(a))
    _check(load_image_data(tmp_path / "x-idx3-ubyte"), a[:, None])


def test_idx_kaggle_spelling_in_a_directory(tmp_path):
    a = _pixels(2, 28, 28)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_idx(a))
    _check(load_image_data(tmp_path), a[:, None])


def test_idx_errors(tmp_path):
    raw = _idx(_pixels(3, 28, 28))
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(raw[:-100])
    message = r"truncated IDX file: header says 3×28×28 = 2352 pixel bytes, file holds 2252"
    with pytest.raises(DataError, match=message):
        load_image_data(f)
    f.write_bytes(raw[:10])
    with pytest.raises(DataError, match="truncated IDX file"):
        load_image_data(f)
    f.write_bytes(raw + b"\0")
    with pytest.raises(DataError, match="oversized IDX file"):
        load_image_data(f)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 0x00000801, 3) + bytes(3) + bytes(8))
    message = r"train-labels-idx1-ubyte: bad IDX magic number 0x00000801; expected 0x00000803"
    with pytest.raises(DataError, match=message):
        load_image_data(labels)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(raw)[:-30])  # a cut gzip stream
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read the IDX file"):
        load_image_data(gz)
    gz.write_bytes(raw)  # not gzip at all
    with pytest.raises(DataError, match="cannot read the IDX file"):
        load_image_data(gz)


# --- NumPy ----------------------------------------------------------------------------------


def test_npz_mnist_style(tmp_path):
    a = _pixels(4, 28, 28)
    np.savez(tmp_path / "mnist.npz", x_train=a, y_train=np.arange(4), x_test=a[:1] * 0)
    _check(load_image_data(tmp_path / "mnist.npz"), a[:, None])


def test_npz_cifar_style_hwc_and_chw(tmp_path):
    chw = _pixels(3, 3, 32, 32)
    np.savez(tmp_path / "hwc.npz", images=chw.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "chw.npz", data=chw)
    _check(load_image_data(tmp_path / "hwc.npz"), chw)
    _check(load_image_data(tmp_path / "chw.npz"), chw)
    gray = _pixels(2, 1, 32, 32)
    np.savez(tmp_path / "hw1.npz", gray.transpose(0, 2, 3, 1))  # saved as arr_0
    _check(load_image_data(tmp_path / "hw1.npz", limit=1), gray[:1])


def test_npz_key_order_and_npy(tmp_path):
    a, b = _pixels(2, 8, 8), _pixels(2, 8, 8, seed=1)
    np.savez(tmp_path / "both.npz", x=b, x_train=a)  # x_train comes first in NPZ_KEYS
    _check(load_image_data(tmp_path / "both.npz"), a[:, None])
    np.save(tmp_path / "plain.npy", b)
    _check(load_image_data(tmp_path / "plain.npy"), b[:, None])


def test_float_arrays_in_unit_and_byte_range(tmp_path):
    a = _pixels(2, 8, 8)
    np.savez(tmp_path / "unit.npz", x=a.astype(np.float32) / 255)
    np.savez(tmp_path / "byte.npz", x=a.astype(np.float64))
    np.savez(tmp_path / "int.npz", x=a.astype(np.int64))
    x = load_image_data(tmp_path / "unit.npz")
    assert float((x.double() - torch.from_numpy(a / 255 * 2 - 1)[:, None]).abs().max()) <= 1e-6
    _check(load_image_data(tmp_path / "byte.npz"), a[:, None])
    _check(load_image_data(tmp_path / "int.npz"), a[:, None])


def test_npz_object_array_is_refused_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    f = tmp_path / "evil.npz"
    np.savez(f, x_train=np.array([_Trap(marker)], dtype=object))  # savez pickles object arrays
    with pytest.raises(DataError, match=r"evil.npz: array 'x_train' holds pickled Python objects, refused"):
        load_image_data(f)
    assert not marker.exists()
    with np.load(f, allow_pickle=True) as z:  # control: the trap does fire when unpickled
        z["x_train"]
    assert marker.exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_train": np.zeros(3)}, r"expected one of the keys x_train, images, x, data, arr_0, found: y_train"),
        ({"x": np.zeros((2, 8, 8, 4), np.uint8)}, r"shape \(2, 8, 8, 4\); expected \(n, H, W\)"),
        ({"x": np.zeros((2, 8), np.uint8)}, r"shape \(2, 8\)"),
        ({"x": np.zeros((0, 8, 8), np.uint8)}, "holds no images"),
        ({"x": np.full((2, 8, 8), 300.0)}, r"pixel values span \[300.0, 300.0\]"),
        ({"x": np.full((2, 8, 8), -0.5)}, r"pixel values span \[-0.5, -0.5\]"),
        ({"x": np.full((2, 8, 8), np.nan)}, "pixel values span"),
        ({"x": np.array(["a", "b"])}, "dtype <U1; expected"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_image_data(tmp_path / "bad.npz")


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(DataError, match=r"junk.npz is not a .npz \(zip\) archive"):
        load_image_data(tmp_path / "junk.npz")
    (tmp_path / "text.npz").write_text("hello")  # numpy would take unknown bytes for a pickle: not said here
    with pytest.raises(DataError, match=r"text.npz is not a .npz \(zip\) archive"):
        load_image_data(tmp_path / "text.npz")


def test_resize_keeps_a_constant_image_constant(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.full((2, 3, 32, 32), 51, np.uint8))
    x = load_image_data(tmp_path / "c.npz", size=8)
    assert x.shape == (2, 3, 8, 8)
    assert float((x - (51 / 127.5 - 1)).abs().max()) <= 1e-6


# --- CIFAR-10 python batches ----------------------------------------------------------------


def _cifar_dir(root: pathlib.Path, batches: list[np.ndarray]) -> pathlib.Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for i, b in enumerate(batches, 1):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": b.reshape(len(b), 3072), b"labels": [0] * len(b)}, f)
    (d / "test_batch").write_bytes(b"not read")
    return d


def test_cifar_batches_are_refused_without_trust(tmp_path):
    d = _cifar_dir(tmp_path, [_pixels(2, 3, 32, 32)])
    marker = tmp_path / "unpickled"
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump(_Trap(marker), f)
    with pytest.raises(DataError, match=r"are pickle files.*pass --trust-pickle \(trust_pickle=True\) only for files"):
        load_image_data(d)
    assert not marker.exists()


def test_cifar_batches_load_with_trust_and_a_warning(tmp_path):
    b1, b2 = _pixels(3, 3, 32, 32), _pixels(2, 3, 32, 32, seed=1)
    d = _cifar_dir(tmp_path, [b1, b2])
    for path in (d, tmp_path):  # the batches directory, or the folder holding it
        with pytest.warns(UserWarning, match="pickle files can execute arbitrary code"):
            x = load_image_data(path, trust_pickle=True)
        _check(x, np.concatenate([b1, b2]))
    with pytest.warns(UserWarning):
        _check(load_image_data(d, trust_pickle=True, limit=2), b1[:2])


def test_cifar_malformed_batch(tmp_path):
    d = _cifar_dir(tmp_path, [_pixels(2, 3, 32, 32)])
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"data_batch_2: not a CIFAR-10 batch"):
        load_image_data(d, trust_pickle=True)
    (d / "data_batch_2").write_bytes(b"\x80\x04 garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"data_batch_2: cannot unpickle"):
        load_image_data(d, trust_pickle=True)


# --- image folders --------------------------------------------------------------------------


def _save(path: pathlib.Path, hwc: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc).save(path)


def test_image_folder_rgb_recursive_sorted(tmp_path):
    imgs = _pixels(3, 5, 7, 3)  # height 5, width 7: a transpose changes the shape
    _save(tmp_path / "b" / "1.png", imgs[1])
    _save(tmp_path / "a.PNG", imgs[0])
    _save(tmp_path / "b" / "2.bmp", imgs[2])
    (tmp_path / "notes.txt").write_text("ignored")
    _check(load_image_data(tmp_path), imgs.transpose(0, 3, 1, 2))
    _check(load_image_data(tmp_path, limit=2), imgs[:2].transpose(0, 3, 1, 2))


def test_image_folder_grayscale_and_mixed(tmp_path):
    gray = _pixels(2, 6, 4)
    _save(tmp_path / "g0.png", gray[0])
    _save(tmp_path / "g1.png", gray[1])
    _check(load_image_data(tmp_path), gray[:, None])
    rgb = _pixels(6, 4, 3, seed=1)
    _save(tmp_path / "g2.png", rgb)  # one colour image: all become RGB, gray ones replicated
    expected = np.concatenate([np.repeat(gray[:, None], 3, axis=1), rgb.transpose(2, 0, 1)[None]])
    _check(load_image_data(tmp_path), expected)


def test_image_folder_sizes(tmp_path):
    _save(tmp_path / "a.png", _pixels(8, 8, 3))
    _save(tmp_path / "b.png", np.full((6, 10, 3), 51, np.uint8))
    with pytest.raises(DataError, match=r"b.png: image size 10×6 differs from .*a.png \(8×8\); pass size=N"):
        load_image_data(tmp_path)
    x = load_image_data(tmp_path, size=4)
    assert x.shape == (2, 3, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert float((x[1] - (51 / 127.5 - 1)).abs().max()) <= 1e-6  # a constant image stays constant


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*empty; supported: an MNIST IDX file"):
        load_image_data(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG not an image")
    with pytest.raises(DataError, match=r"x.png: cannot read the image"):
        load_image_data(tmp_path / "bad")


# --- paths and arguments --------------------------------------------------------------------


def test_absent_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"no such file or directory: .*missing\.npz$"):
        load_image_data(tmp_path / "missing.npz")
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(DataError, match=r"unsupported data file .*data\.csv; supported: ") as e:
        load_image_data(tmp_path / "data.csv")
    assert all(fmt in str(e.value) for fmt in SUPPORTED_FORMATS) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImplicitDiffusionError)


@pytest.mark.parametrize(("kwargs", "message"), [({"limit": 0}, "limit must be"), ({"size": -1}, "size must be")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_image_data(tmp_path, **kwargs)
