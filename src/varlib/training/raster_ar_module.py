"""RasterARModule: trains the raster-scan next-token baseline (:class:`~varlib.models.raster_ar.RasterAR`) on a
frozen single-scale tokenizer with VAR's recipe (shared through
:class:`~varlib.training.token_transformer_module.TokenTransformerModule`).

Batches are images ``(img (B,3,H,W) in [-1,1], labels (B,))``, tokenised on the fly, or ``(tokens (B,L) int64,
labels (B,))`` from a token cache that ``varlib-tokenize`` wrote with the single-scale tokenizer (one token map per
image, so each row is the raster-ordered map). Validation logs the same metric names as VAR; with one scale,
``loss_last`` equals ``loss_avg``.
"""

from __future__ import annotations

import torch

from varlib.models.raster_ar import RasterAR
from varlib.training.token_transformer_module import TokenTransformerModule


class RasterARModule(TokenTransformerModule):
    """Next-token prediction with teacher forcing and per-token cross-entropy.

    Args:
        var: ``RasterAR`` keyword arguments (depth, num_classes, width, cond_drop_rate, ...): the config key
            ``model.var``, as for VAR. The network is the module's ``ar`` (its files' prefix).
        tokenizer_path, vae: a single-scale tokenizer.
        loss: ``label_smoothing`` only (:class:`~varlib.training.settings.TokenLossConfig`).
        Every other argument as :class:`~varlib.training.token_transformer_module.TokenTransformerModule` (VAR's
        optimisation recipe and fine-tuning: ``init_from``, ``class_map``, ``class_names``, ``trainable``,
        ``lora``). VAR's progressive training and activation checkpointing have no counterpart here and are not
        accepted.
    """

    transformer_class = RasterAR

    @torch.no_grad()
    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels (B,), targets (B,L), input tokens (B,L-1)): the input is the target shifted by one."""
        x, labels = batch
        if x.dtype == torch.long:
            self.check_token_batch(x)
            tokens_BL = x
        else:
            with torch.autocast(device_type=self.device.type, enabled=False):
                tokens_BL = self.vae.encode_tokens(x.float())[0]
        return labels.long(), tokens_BL, tokens_BL[:, :-1]
