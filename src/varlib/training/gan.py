"""Adversarial loss terms for VQGAN-style tokenizer training.

Discriminator losses take logits of any shape (e.g. PatchGAN maps (B, 1, h, w)) and average over all elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``, a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (binary cross-entropy) discriminator loss
    ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``, a scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss ``-mean(logits_fake)``, a scalar: the generator raises the discriminator's score."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer_weight: Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """Balance the GAN term against reconstruction: ``||d rec / d W|| / (||d g / d W|| + eps)``.

    Args:
        rec_loss: scalar reconstruction (+ perceptual) loss.
        g_loss: scalar generator loss.
        last_layer_weight: W, the weight of the decoder's output layer; both losses must depend on it.
        max_weight: upper clamp; the result is also clamped at 0.
        eps: keeps the ratio finite when the GAN gradient vanishes.

    Returns:
        Detached scalar weight. The graph is retained, so both losses can still be back-propagated.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def gan_start_factor(step: int, start_step: int) -> float:
    """0.0 before ``start_step``, 1.0 from it on: switches the adversarial terms on late in training."""
    return 1.0 if step >= start_step else 0.0
