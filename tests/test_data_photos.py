"""Patches of scikit-learn's sample photographs: shapes, provenance, reproducibility, mean colour."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Z

from implicit_diffusion.data import load_photo_patches
from implicit_diffusion.data.photos import _photos
from implicit_diffusion.errors import DataError


@functools.lru_cache
def _reference_photos(scale: int) -> torch.Tensor:
    """The photos computed independently: numpy block means of the uint8 arrays, float64."""
    from sklearn.datasets import load_sample_images

    out = []
    for im in load_sample_images().images:  # (427, 640, 3) uint8
        h, w = im.shape[0] // scale, im.shape[1] // scale
        blocks = im[: h * scale, : w * scale].astype(np.float64).reshape(h, scale, w, scale, 3)
        out.append(blocks.mean(axis=(1, 3)).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out))


@functools.lru_cache
def _uint8_photos() -> tuple[torch.Tensor, torch.Tensor]:
    """The photos as uint8 (2, 3, H, W) and their pixels' RGB keys (2, H, W) (see ``_rgb_key``)."""
    from sklearn.datasets import load_sample_images

    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).contiguous()
    return photos, _rgb_key(photos)


def _rgb_key(x: torch.Tensor) -> torch.Tensor:
    """uint8 (k, 3, H, W) → int32 (k, H, W) holding r·65536 + g·256 + b (one compare per pixel)."""
    x = x.to(torch.int32)
    return x[:, 0] * 65536 + x[:, 1] * 256 + x[:, 2]


def _find_crop(patch: torch.Tensor) -> set[tuple[int, int, int]]:
    """All (photo, top, left) where the uint8 ``patch`` (3, s, s) equals a crop of a photo."""
    photos, key = _uint8_photos()
    s = patch.shape[-1]
    hit = key == int(_rgb_key(patch[None, :, :1, :1]))  # candidate top-left corners
    hit[:, photos.shape[2] - s + 1 :, :] = False
    hit[:, :, photos.shape[3] - s + 1 :] = False
    return {
        (k, y, x) for k, y, x in hit.nonzero().tolist() if torch.equal(photos[k, :, y : y + s, x : x + s], patch)
    }


@pytest.mark.parametrize(("n", "size", "scale"), [(1, 1, 1), (7, 8, 4), (3, 16, 2)])
def test_shape_dtype_range(n, size, scale):
    x = load_photo_patches(n, size, generator=torch.Generator().manual_seed(0), scale=scale)
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_reproducible_with_the_same_generator_and_not_with_another():
    a = load_photo_patches(50, generator=torch.Generator().manual_seed(0))
    b = load_photo_patches(50, generator=torch.Generator().manual_seed(0))
    c = load_photo_patches(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("scale", [1, 4])
def test_photos_are_the_pooled_sample_images(scale):
    """``_photos`` against an independent numpy block mean (float32 rounding only)."""
    mine, ref = _photos(scale), _reference_photos(scale)  # ref is cached: compared, never mutated
    assert mine.shape == ref.shape == (2, 3, 427 // scale, 640 // scale)
    assert float((mine.double() - ref).abs().max()) <= 1e-6  # (assert_close takes ~1 s on 1.6M values)
    mine[:] = 0  # a copy: the cache is untouched
    assert not torch.equal(_photos(scale), mine)


def test_patches_are_crops_of_the_photos(generator):
    """At scale=1 every patch is an exact crop of one photo (compared as uint8 values, after
    checking the patch pixels are v/127.5 − 1 for integers v); both photos get used."""
    photos, _ = _uint8_photos()
    assert _find_crop(photos[1, :, 100:108, 200:208]) >= {(1, 100, 200)}  # positive control
    noise = torch.randint(0, 256, (3, 8, 8), generator=generator, dtype=torch.uint8)
    assert _find_crop(noise) == set()  # negative control: the search can fail
    x = load_photo_patches(20, 8, generator=generator, scale=1)
    v = ((x.double() + 1) * 127.5).round()
    assert float((x.double() - (v / 127.5 - 1)).abs().max()) <= 1e-6
    where = [_find_crop(p) for p in v.to(torch.uint8)]
    assert all(where), "a patch matches no crop of the photos"
    assert {k for w in where for k, _, _ in w} == {0, 1}


def test_mean_colour_matches_the_photos(generator):
    """Per-channel mean over n=4000 patches vs its exact expectation: the mean over both photos of
    all valid 8×8 windows (avg_pool2d with stride 1). Patches are i.i.d., so the tolerance is
    Z·sd/√n with sd the sample sd of one patch's mean colour. Negative control: the same check
    against one photo's windows alone must fail."""
    n, size = 4000, 8
    x = load_photo_patches(n, size, generator=generator)
    m = x.double().mean((2, 3))  # (n, 3): each patch's mean colour
    windows = F.avg_pool2d(_reference_photos(4), size, stride=1).mean((2, 3))  # (2, 3)
    tol = Z * m.std(0) / math.sqrt(n)
    assert ((m.mean(0) - windows.mean(0)).abs() <= tol).all()
    assert ((m.mean(0) - windows[0]).abs() > tol).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"size": 0}, "size must be an integer >= 1, got 0"),
        ({"scale": 0}, "scale must be an integer >= 1, got 0"),
        ({"size": 107}, r"size 107 does not fit .* allowed: size <= 106"),
        ({"size": 14, "scale": 32}, r"allowed: size <= 13"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    args = {"n": 2, "size": 8, **kwargs}
    with pytest.raises(DataError, match=message):
        load_photo_patches(args.pop("n"), generator=torch.Generator(), **args)
