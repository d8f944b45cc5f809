"""Training of score models: denoising score matching."""

from .dsm import dsm_loss

__all__ = ["dsm_loss"]
