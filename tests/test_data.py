"""Built-in data sets: shapes, ranges, reproducibility, errors."""

import pytest
import torch

from implicit_diffusion.data import TWO_D_DATASETS, load_digits_images, two_d_dataset


@pytest.mark.parametrize("name", TWO_D_DATASETS)
def test_two_d_sets_are_reproducible_and_sane(name):
    a = two_d_dataset(name, 2000, generator=torch.Generator().manual_seed(0))
    b = two_d_dataset(name, 2000, generator=torch.Generator().manual_seed(0))
    c = two_d_dataset(name, 2000, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().max() < 8 and a.std(0).min() > 0.3


def test_gaussian_mixture_has_its_eight_modes():
    """Each of the 8 centres 4(cos 2πk/8, sin 2πk/8) holds 1/8 of 16k points: within 5 SE of a binomial."""
    x = two_d_dataset("gaussian-mixture", 16_000, generator=torch.Generator().manual_seed(3))
    k = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * torch.pi / 8)).remainder(8)
    counts = torch.bincount(k.long(), minlength=8).float()
    se = (16_000 * (1 / 8) * (7 / 8)) ** 0.5
    assert ((counts - 2000).abs() < 5 * se).all()


def test_digits_are_the_bundled_images_scaled():
    d = load_digits_images()
    assert d.shape == (1797, 1, 8, 8) and d.dtype == torch.float32
    assert d.min() == -1.0 and d.max() == 1.0


def test_unknown_set_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: moons, swiss-roll, rings, gaussian-mixture"):
        two_d_dataset("spiral", 10, generator=torch.Generator())
    with pytest.raises(ValueError, match="n must be >= 1"):
        two_d_dataset("moons", 0, generator=torch.Generator())
