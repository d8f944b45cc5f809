"""The shipped pretrained models: loadable, documented, and trained (not noise)."""

import dataclasses

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
