"""VARModule: trains the VAR transformer on a frozen tokenizer with the official recipe (Lightning, thin).

Batches are either images ``(img (B,3,H,W) in [-1,1], labels (B,))``, tokenised on the fly by the frozen
tokenizer in fp32, or pre-tokenised ``(tokens (B,L) int64, labels (B,))`` from the token cache; captioned data
appends the captions (B str), on which a text-conditional VAR trains, and a cache may add their precomputed features.
"""

from __future__ import annotations

import torch

from varlib.models.patch_schedules import scale_slices
from varlib.models.transformer import VAR
from varlib.training.settings import VARLossConfig
from varlib.training.optim_schedules import progressive_num_scales
from varlib.training.token_transformer_module import TokenTransformerModule


class VARModule(TokenTransformerModule):
    """Next-scale prediction with teacher forcing and uniform per-token cross-entropy (the construction, training
    loop, EMA, FSDP2, sample grid and export are :class:`~varlib.training.token_transformer_module.TokenTransformerModule`'s,
    which documents the arguments).

    Args:
        var: the :class:`~varlib.models.transformer.VARConfig` fields (depth, num_classes, cond_drop_rate, ...); the
            other arguments are the base class's, with
        loss: the fields of :class:`~varlib.training.settings.VARLossConfig`: label smoothing and progressive training.
        attn_impl: the teacher-forced attention (``VAR(attn_impl=...)``: auto, dense, prefix, flex).
        activation_checkpointing: recompute each block's activations in the backward pass (less memory,
            about one more forward of compute); per block, so it composes with DDP and FSDP2's per-block sharding.
    """

    transformer_class = VAR
    loss_class = VARLossConfig

    def __init__(self, *args, attn_impl: str = "auto", activation_checkpointing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.slices = scale_slices(self.var.patch_nums)

    def runtime_settings(self) -> dict:
        return dict(attn_impl=self.hparams.attn_impl, activation_checkpointing=self.hparams.activation_checkpointing)

    # -- data -> (tokens, teacher-forcing input) ------------------------------------------------------

    @torch.no_grad()
    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(condition: labels (B,), captions or their features, targets (B,L), teacher-forcing input (B,L-1,Cvae)),
        in fp32."""
        x, labels, *text = batch
        with torch.autocast(device_type=self.device.type, enabled=False):
            if x.dtype == torch.long:
                self.check_token_batch(x)
                tokens = [x[:, sl] for sl in self.slices]
            else:
                tokens = self.vae.encode_tokens(x.float(), self.var.patch_nums)
            x_BLCv = self.vae.teacher_forcing_input(tokens, self.var.patch_nums)
        return self.batch_condition(labels, text), torch.cat(tokens, dim=1), x_BLCv

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
