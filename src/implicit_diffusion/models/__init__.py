"""Parametric models: potentials V(x, θ) and time-conditioned score networks."""

from .diffusion_model import DiffusionModel
from .mixture import HEXAGON_THETA0, GaussianMixture, hexagon_centres, hexagon_mixture
from .potentials import (
    EnergyMLP,
    FunctionPotential,
    GaussianPotential,
    ModulePotential,
    Potential,
    as_potential,
    autograd_energy_grad,
)
from .score_nets import ScoreMLP, SinusoidalTimeEmbedding
from .shifted import ShiftedPotential
from .tilted import TiltedPotential
from .unet import UNet

__all__ = [
    "DiffusionModel",
    "HEXAGON_THETA0",
    "EnergyMLP",
    "FunctionPotential",
    "GaussianMixture",
    "GaussianPotential",
    "ModulePotential",
    "Potential",
    "ScoreMLP",
    "ShiftedPotential",
    "SinusoidalTimeEmbedding",
    "TiltedPotential",
    "UNet",
    "as_potential",
    "autograd_energy_grad",
    "hexagon_centres",
    "hexagon_mixture",
]
