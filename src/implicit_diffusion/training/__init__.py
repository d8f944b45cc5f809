"""Training of score models: denoising score matching and pretraining with an EMA."""

from .dsm import dsm_loss
from .pretrain import DSMTrainer, PretrainInfo, pretrain_score_model

__all__ = ["DSMTrainer", "PretrainInfo", "dsm_loss", "pretrain_score_model"]
