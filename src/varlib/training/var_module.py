"""VARModule: trains the VAR transformer on a frozen tokenizer with the official recipe (Lightning, thin).

Batches are either images ``(img (B,3,H,W) in [-1,1], labels (B,))``, tokenised on the fly by the frozen
tokenizer in fp32, or pre-tokenised ``(tokens (B,L) int64, labels (B,))`` from the token cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from varlib.io import load
from varlib.models.patch_schedules import scale_slices
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.models.sampling import SamplingConfig
from varlib.official import OFFICIAL_SAMPLING
from varlib.training.ema import ModelEMA
from varlib.training.optim_schedules import progressive_num_scales
from varlib.training.token_transformer_module import (
    RecipeOptimConfig,
    TokenLossConfig,
    TokenTransformerModule,
    check_grid,
    recipe_optimizer_factory,
)
from varlib.training.tokenizer_loss import build_config


def load_tokenizer(path: str) -> MultiScaleVQVAE:
    """A frozen tokenizer from any tokenizer file ``varlib.load`` opens (a varlib file or checkpoint, or the
    official ``vae_ch160v4096z32.pth``)."""
    vae = load(path)
    if not isinstance(vae, MultiScaleVQVAE):
        raise ValueError(f"{path} holds a {type(vae).__name__}, expected a tokenizer (MultiScaleVQVAE)")
    return vae.eval().requires_grad_(False)


@dataclass(frozen=True)
class VARLossConfig(TokenLossConfig):
    """VAR's loss (``model.loss``): label smoothing and progressive training, which grows the trained scales
    from ``progressive_first`` to all by ``progressive_fraction`` of training (0 = off, official default)."""

    progressive_fraction: float = 0.0
    progressive_first: int = 4


class VARModule(TokenTransformerModule):
    """Next-scale prediction with teacher forcing and uniform per-token cross-entropy (the training loop, EMA,
    FSDP2, sample grid and export are :class:`~varlib.training.token_transformer_module.TokenTransformerModule`'s).

    Args:
        tokenizer_path: the frozen tokenizer (varlib file or official checkpoint); or pass ``vae``.
        var: ``VAR`` keyword arguments (depth, num_classes, cond_drop_rate, ...).
        optim: the optimisation recipe, the fields of
            :class:`~varlib.training.token_transformer_module.RecipeOptimConfig` (official defaults).
        optimizer: the optimiser as a config node ``{_target_: torch.optim.AdamW, betas: [0.9, 0.95], ...}``
            (plain data); the module calls its target with the weight-decay parameter groups and the peak lr
            (default: the official AdamW, fused on CUDA).
        loss: the fields of :class:`VARLossConfig`: label smoothing and progressive training.
        ema_decay: keep an EMA of the transformer used for validation, sampling and export (None = off). Under
            FSDP2 its tensors are sharded like the parameters (DTensors) and gathered on export.
        activation_checkpointing: recompute each block's activations in the backward pass (less memory,
            about one more forward of compute); per block, so it composes with DDP and FSDP2's per-block sharding.
        grid_classes, grid_per_class: after each validation, a grid of ``grid_per_class`` samples (rows) of
            classes 0..grid_classes-1 (columns), drawn with ``sampling`` and a fixed seed, goes to TensorBoard
            (``val/samples``); 0 classes, or no TensorBoard logger, skips it.
        sampling: the recommended ``generate`` settings (cfg, top_k, top_p) that validation samples use and
            the exported model file carries (default: the official FID settings 1.5, 900, 0.96).
        seed: the random draws of training step s (label dropout, drop-path) are seeded with
            seed + s * world_size + rank, so a run resumed from a checkpoint replays them exactly.
    """

    def __init__(
        self,
        var: Mapping[str, Any],
        tokenizer_path: str | None = None,
        vae: MultiScaleVQVAE | None = None,
        optim: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
        activation_checkpointing: bool = False,
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
        self.loss_config = build_config(VARLossConfig, loss, "model.loss")
        check_grid(grid_classes, grid_per_class)
        self.save_hyperparameters(ignore=["vae"])
        self.vae = load_tokenizer(tokenizer_path) if vae is None else vae.eval().requires_grad_(False)
        self.var = self.build_transformer()
        self.var.sampling = OFFICIAL_SAMPLING if sampling is None else SamplingConfig.from_dict(sampling)
        self.slices = scale_slices(self.var.patch_nums)
        self.ema = ModelEMA(self.var, ema_decay) if ema_decay else None

    @property
    def transformer(self) -> VAR:
        return self.var

    def build_transformer(self) -> VAR:
        return VAR(self.vae, **dict(self.hparams.var), activation_checkpointing=self.hparams.activation_checkpointing)

    # -- data -> (tokens, teacher-forcing input) ------------------------------------------------------

    @torch.no_grad()
    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels (B,), targets (B,L), teacher-forcing input (B,L-1,Cvae)), computed in fp32."""
        x, labels = batch
        with torch.autocast(device_type=self.device.type, enabled=False):
            if x.dtype == torch.long:
                if x.ndim != 2 or x.shape[1] != self.var.L:
                    raise ValueError(f"token batches must be (B, L={self.var.L}), got {tuple(x.shape)}")
                tokens = [x[:, sl] for sl in self.slices]
            else:
                tokens = self.vae.encode_tokens(x.float(), self.var.patch_nums)
            x_BLCv = self.vae.teacher_forcing_input(tokens, self.var.patch_nums)
        return labels.long(), torch.cat(tokens, dim=1), x_BLCv

    def active_length(self) -> int:
        """Tokens trained at the current step (all of them unless progressive training is on)."""
        loss = self.loss_config
        if loss.progressive_fraction <= 0:
            return self.var.L
        total = self.trainer.estimated_stepping_batches
        start = int(self.optim_config.warmup_fraction * total)
        n = progressive_num_scales(self.global_step, start, int(loss.progressive_fraction * total),
                                   loss.progressive_first, len(self.slices))
        return self.slices[n - 1].stop
