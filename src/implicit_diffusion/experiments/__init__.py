"""Experiments: each a frozen config dataclass and ``run(config) -> result``."""

from . import diffusion_finetune, diffusion_gaussian_1d, ebm, hyperparameter, langevin_mixture, rates

__all__ = [
    "EXPERIMENTS",
    "diffusion_finetune",
    "diffusion_gaussian_1d",
    "ebm",
    "hyperparameter",
    "langevin_mixture",
    "rates",
]

# name → module with ``Config``-class attribute and ``run``; the CLI looks experiments up here.
EXPERIMENTS = {
    "langevin-mixture": langevin_mixture,
    "diffusion-gaussian-1d": diffusion_gaussian_1d,
    "diffusion-finetune": diffusion_finetune,
    "ebm": ebm,
    "hyperparameter": hyperparameter,
    "rates": rates,
}
