"""Image rewards: values on known images, gradients, and shape errors."""

import pytest
import torch

from implicit_diffusion.objectives import IMAGE_REWARDS, brightness, redness


def test_brightness_is_the_mean_pixel_and_its_gradient_is_uniform():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4).requires_grad_()
    r = brightness(x)
    torch.testing.assert_close(r, x.detach().reshape(2, -1).mean(1))
    r.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 48))


def test_redness_weighs_red_up_and_the_others_down():
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    redness(x).sum().backward()
    g = x.grad[0, :, 0, 0] * 4
    torch.testing.assert_close(g, torch.tensor([1.0, -0.5, -0.5]))
    grey = torch.full((1, 3, 2, 2), 0.3)
    assert redness(grey).abs().item() < 1e-7  # grey is neither red nor not


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 1, 8, 8\)"):
        redness(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        brightness(torch.zeros(5, 2))
    assert set(IMAGE_REWARDS) == {"brightness", "red"}


def test_pixels_beyond_the_range_earn_nothing_more():
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0]).reshape(1, 1, 2, 2).requires_grad_()
    r = brightness(x)
    assert r.item() == pytest.approx((-1 - 0.5 + 0.5 + 1) / 4)
    r.backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([0.0, 0.25, 0.25, 0.0]))
    rgb = torch.tensor([5.0, -5.0, -5.0])[None, :, None, None].expand(1, 3, 1, 1)
    assert redness(rgb).item() == pytest.approx(2.0)
