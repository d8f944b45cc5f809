"""Parametric models: potentials V(x, θ) (and, later, score networks)."""

from .tilted import TiltedPotential
from .potentials import (
    HEXAGON_THETA0,
    EnergyMLP,
    FunctionPotential,
    GaussianMixture,
    GaussianPotential,
    ModulePotential,
    Potential,
    as_potential,
    hexagon_centres,
    hexagon_mixture,
)

__all__ = [
    "HEXAGON_THETA0",
    "EnergyMLP",
    "FunctionPotential",
    "GaussianMixture",
    "GaussianPotential",
    "ModulePotential",
    "Potential",
    "TiltedPotential",
    "as_potential",
    "hexagon_centres",
    "hexagon_mixture",
]
