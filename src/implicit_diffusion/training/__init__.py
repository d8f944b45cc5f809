"""Training of score models: denoising score matching and pretraining with an EMA."""

from .dsm import dsm_loss
from .pretrain import PretrainInfo, pretrain_score_model

__all__ = ["PretrainInfo", "dsm_loss", "pretrain_score_model"]
