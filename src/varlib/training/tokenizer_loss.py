"""The tokenizer's training objective (VAR paper, eq. 5) as plain functions (its settings:
:class:`varlib.training.settings.TokenizerLossConfig`).

Autoencoder loss for images x and reconstructions x_hat (B,3,H,W) in [-1, 1]::

    L = l2_weight ||x - x_hat||^2 + l1_weight |x - x_hat| + vq_weight L_vq + lpips_weight LPIPS(x, x_hat)
        + gan_factor * disc_weight * lambda_adaptive * L_G

with lambda_adaptive the taming-style ratio of gradient norms at the decoder's last layer, and gan_factor 0 before
``disc_start_step`` and 1 from it on. The discriminator minimises the hinge (or vanilla) loss from the same step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from varlib.training.settings import DISC_LOSS_NAMES, TokenizerLossConfig
from varlib.training.gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss, vanilla_d_loss

DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = dict(zip(DISC_LOSS_NAMES, (hinge_d_loss, vanilla_d_loss)))

def reconstruction_loss(recon_BCHW: Tensor, img_BCHW: Tensor, l2_weight: float, l1_weight: float) -> Tensor:
    """Weighted mean squared plus mean absolute error, a scalar."""
    loss = l2_weight * F.mse_loss(recon_BCHW, img_BCHW)
    if l1_weight > 0:
        loss = loss + l1_weight * F.l1_loss(recon_BCHW, img_BCHW)
    return loss


def autoencoder_loss(
    img_BCHW: Tensor,
    recon_BCHW: Tensor,
    vq_loss: Tensor,
    config: TokenizerLossConfig,
    perceptual: nn.Module | None,
    discriminator: nn.Module | None,
    last_layer_weight: Tensor,
    gan_factor: float,
) -> dict[str, Tensor]:
    """The autoencoder's loss (eq. 5) and its parts.

    Args:
        img_BCHW, recon_BCHW: targets and unclamped reconstructions (B,3,H,W).
        vq_loss: the quantizer's scalar VQ loss (its commitment weight beta is already inside).
        perceptual: LPIPS module, used when ``config.lpips_weight > 0``.
        discriminator: PatchGAN, used when ``gan_factor * config.disc_weight > 0``.
        last_layer_weight: the decoder's output weight, for the adaptive GAN weight.
        gan_factor: 0 before the discriminator's start step, 1 after.
    Returns:
        {"total", "rec", "vq"[, "lpips"][, "gan_g", "gan_weight"]}: scalars; "total" carries the graph.
    """
    rec = reconstruction_loss(recon_BCHW, img_BCHW, config.l2_weight, config.l1_weight)
    parts = {"rec": rec, "vq": vq_loss}
    nll = rec
    if config.lpips_weight > 0:
        if perceptual is None:
            raise ValueError("loss.lpips_weight > 0 needs a perceptual module")
        parts["lpips"] = perceptual(recon_BCHW, img_BCHW)
        nll = nll + config.lpips_weight * parts["lpips"]
    total = nll + config.vq_weight * vq_loss
    if gan_factor > 0 and config.disc_weight > 0:
        if discriminator is None:
            raise ValueError("loss.disc_weight > 0 needs a discriminator")
        g_loss = hinge_g_loss(discriminator(recon_BCHW))
        weight = config.disc_weight * adaptive_gan_weight(nll, g_loss, last_layer_weight, config.max_adaptive_weight)
        total = total + gan_factor * weight * g_loss
        parts |= {"gan_g": g_loss, "gan_weight": weight}
    parts["total"] = total
    return parts


def discriminator_loss(img_BCHW: Tensor, recon_BCHW: Tensor, discriminator: nn.Module, kind: str) -> Tensor:
    """``kind`` ('hinge' or 'vanilla') loss of the discriminator on real images vs detached reconstructions."""
    return DISC_LOSSES[kind](discriminator(img_BCHW), discriminator(recon_BCHW.detach()))

