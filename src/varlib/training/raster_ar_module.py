"""RasterARModule: trains the raster-scan next-token baseline (:class:`~varlib.models.raster_ar.RasterAR`) on a
frozen single-scale tokenizer with VAR's recipe (shared through
:class:`~varlib.training.token_transformer_module.TokenTransformerModule`).

Batches are images ``(img (B,3,H,W) in [-1,1], labels (B,))``, tokenised on the fly, or ``(tokens (B,L) int64,
labels (B,))`` from a token cache that ``varlib-tokenize`` wrote with the single-scale tokenizer (one token map per
image, so each row is the raster-ordered map). Validation logs the same metric names as VAR; with one scale,
``loss_last`` equals ``loss_avg``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from varlib.models.raster_ar import RasterAR
from varlib.models.sampling import SamplingConfig
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.ema import ModelEMA
from varlib.training.token_transformer_module import (
    RecipeOptimConfig,
    TokenLossConfig,
    TokenTransformerModule,
    check_grid,
    recipe_optimizer_factory,
)
from varlib.training.tokenizer_loss import build_config
from varlib.training.var_module import load_tokenizer


class RasterARModule(TokenTransformerModule):
    """Next-token prediction with teacher forcing and per-token cross-entropy.

    Args:
        ar: ``RasterAR`` keyword arguments (depth, num_classes, width, cond_drop_rate, ...).
        tokenizer_path: the frozen single-scale tokenizer (varlib file or checkpoint); or pass ``vae``.
        sampling: the recommended ``generate`` settings (cfg, top_k, top_p) of validation grids and the exported
            file (default: RasterAR's, cfg 1.5 without top-k/top-p filtering).
        loss: ``label_smoothing`` only (:class:`~varlib.training.token_transformer_module.TokenLossConfig`).
        Every other argument as :class:`~varlib.training.var_module.VARModule` (VAR's optimisation recipe). VAR's
        progressive training and activation checkpointing have no counterpart here and are not accepted.
    """

    def __init__(
        self,
        ar: Mapping[str, Any],
        tokenizer_path: str | None = None,
        vae: MultiScaleVQVAE | None = None,
        optim: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
        sampling: Mapping[str, float] | None = None,
        grid_classes: int = 8,
        grid_per_class: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if (tokenizer_path is None) == (vae is None):
            raise ValueError("give exactly one of tokenizer_path or vae")
        self.optim_config = build_config(RecipeOptimConfig, optim, "model.optim")
        self.optimizer_factory = recipe_optimizer_factory(optimizer)
        self.loss_config = build_config(TokenLossConfig, loss, "model.loss")
        check_grid(grid_classes, grid_per_class)
        self.save_hyperparameters(ignore=["vae"])
        self.vae = load_tokenizer(tokenizer_path) if vae is None else vae.eval().requires_grad_(False)
        self.ar = self.build_transformer()
        if sampling is not None:
            self.ar.sampling = SamplingConfig.from_dict(sampling)
        self.ema = ModelEMA(self.ar, ema_decay) if ema_decay else None

    @property
    def transformer(self) -> RasterAR:
        return self.ar

    def build_transformer(self) -> RasterAR:
        return RasterAR(self.vae, **dict(self.hparams.ar))

    @torch.no_grad()
    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels (B,), targets (B,L), input tokens (B,L-1)): the input is the target shifted by one."""
        x, labels = batch
        if x.dtype == torch.long:
            if x.ndim != 2 or x.shape[1] != self.ar.L:
                raise ValueError(f"token batches must be (B, L={self.ar.L}), got {tuple(x.shape)}")
            tokens_BL = x
        else:
            with torch.autocast(device_type=self.device.type, enabled=False):
                tokens_BL = self.vae.encode_tokens(x.float())[0]
        return labels.long(), tokens_BL, tokens_BL[:, :-1]
