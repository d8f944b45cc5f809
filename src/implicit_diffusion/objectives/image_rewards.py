"""Rewards on images for finetuning diffusion models (Marion et al. 2024, §5.2).

Images are ``(B, C, H, W)`` with pixels in [−1, 1]; each reward returns ``(B,)`` and is
differentiable in the pixels (the adjoint starts from ∇ₓR at the sampler's last state).
Rewards read the image as displayed, clip(x, −1, 1): a sample pixel beyond the range earns
nothing more (its gradient is 0), so the rewards are bounded and finetuning cannot raise them by
pushing pixels off the scale.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["IMAGE_REWARDS", "brightness", "redness"]


def brightness(x: Tensor) -> Tensor:
    """R(x) = mean of all pixels of each image: (1/CHW) Σ_{c,h,w} clip(x_{chw}, −1, 1), in [−1, 1].

    >>> import torch
    >>> brightness(torch.stack([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])).tolist()
    [1.0, -1.0]
    """
    if x.ndim != 4:
        raise ValueError(f"brightness expects images (B, C, H, W), got shape {tuple(x.shape)}")
    return x.clamp(-1.0, 1.0).mean(dim=(1, 2, 3))


def redness(x: Tensor) -> Tensor:
    """R(x) = mean over pixels of r − (g + b)/2 (each channel clipped to [−1, 1]): the red channel
    minus the mean of the other two, in [−2, 2]; needs C = 3 (RGB).

    >>> import torch
    >>> red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 2, 2)
    >>> redness(red).tolist()
    [2.0]
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"the red reward needs RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
    x = x.clamp(-1.0, 1.0)
    return (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).mean(dim=(1, 2))


IMAGE_REWARDS = {"brightness": brightness, "red": redness}
