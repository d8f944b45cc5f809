"""Parametric models: potentials V(x, θ), time-conditioned score networks, LoRA adapters."""

from .classifier import DigitClassifier, load_classifier, save_classifier
from .diffusion_model import DiffusionModel
from .lora import add_lora, has_lora, load_lora_state_dict, lora_parameters, lora_state_dict, merge_lora
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
    "DigitClassifier",
    "load_classifier",
    "save_classifier",
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
    "add_lora",
    "as_potential",
    "autograd_energy_grad",
    "has_lora",
    "hexagon_centres",
    "hexagon_mixture",
    "load_lora_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
]
