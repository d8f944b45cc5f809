"""Sampler steps. Each family shares one step signature (see :mod:`.langevin`)."""

from .langevin import LangevinInfo, draw_noise, energy_grad, ula_step

__all__ = ["LangevinInfo", "draw_noise", "energy_grad", "ula_step"]
