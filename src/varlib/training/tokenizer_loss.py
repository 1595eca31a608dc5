"""The tokenizer's training objective (VAR paper, eq. 5) and optimiser settings, as plain dataclasses and functions.

Autoencoder loss for images x and reconstructions x_hat (B,3,H,W) in [-1, 1]::

    L = l2_weight ||x - x_hat||^2 + l1_weight |x - x_hat| + vq_weight L_vq + lpips_weight LPIPS(x, x_hat)
        + gan_factor * disc_weight * lambda_adaptive * L_G

with lambda_adaptive the taming-style ratio of gradient norms at the decoder's last layer, and gan_factor 0 before
``disc_start_step`` and 1 from it on. The discriminator minimises the hinge (or vanilla) loss from the same step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from varlib.training.gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss, vanilla_d_loss
from varlib.training.optim_schedules import LR_DECAYS

DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}

ConfigT = TypeVar("ConfigT")


def _check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def _check_step(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class TokenizerLossConfig:
    """Weights of the loss terms and the GAN schedule (``model.loss`` in the Hydra config).

    Steps count Lightning's ``global_step``: one per batch before ``disc_start_step``, two per batch after it
    (the discriminator's optimiser step counts too, Lightning's convention for manual optimisation).
    """

    l2_weight: float = 1.0
    l1_weight: float = 0.0
    vq_weight: float = 1.0
    lpips_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start_step: int = 0
    disc_loss: str = "hinge"
    max_adaptive_weight: float = 1e4

    def __post_init__(self) -> None:
        for name in ("l2_weight", "l1_weight", "vq_weight", "lpips_weight", "disc_weight"):
            _check_number(f"loss.{name}", getattr(self, name))
        if self.l2_weight == 0 and self.l1_weight == 0:
            raise ValueError("loss.l2_weight or loss.l1_weight must be > 0, got both 0 (nothing to reconstruct)")
        _check_step("loss.disc_start_step", self.disc_start_step)
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"loss.disc_loss must be one of {sorted(DISC_LOSSES)}, got {self.disc_loss!r}")
        _check_number("loss.max_adaptive_weight", self.max_adaptive_weight, strict=True)


@dataclass(frozen=True)
class OptimConfig:
    """What the module sets on both optimisers (``model.optim``; ``model.optimizer`` chooses their class and its
    other arguments): ``lr`` (``disc_lr`` for the discriminator, None meaning ``lr``) and ``weight_decay``.

    The learning rate rises linearly over ``warmup_steps`` and then stays (``decay: constant``) or follows a
    half cosine down to ``min_lr_ratio * lr`` at the trainer's ``max_steps`` (``decay: cosine``).
    ``decay_by_time`` also measures the decay against the trainer's ``max_time``: its progress is the larger
    of the step and the elapsed-time fractions, so a run that ``max_time`` stops early still ends annealed
    (without ``max_time`` the steps alone count).
    ``grad_clip`` is the max gradient norm of each optimiser (None: no clipping).
    """

    lr: float = 1e-4
    disc_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.0
    decay_by_time: bool = False
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check_number("optim.lr", self.lr, strict=True)
        if self.disc_lr is not None:
            _check_number("optim.disc_lr", self.disc_lr, strict=True)
        _check_number("optim.weight_decay", self.weight_decay)
        _check_step("optim.warmup_steps", self.warmup_steps)
        if self.decay not in LR_DECAYS:
            raise ValueError(f"optim.decay must be one of {LR_DECAYS}, got {self.decay!r}")
        _check_number("optim.min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.decay_by_time, bool):
            raise ValueError(f"optim.decay_by_time must be true or false, got {self.decay_by_time!r}")
        if self.grad_clip is not None:
            _check_number("optim.grad_clip", self.grad_clip, strict=True)


def build_config(config_class: type[ConfigT], values: Mapping[str, Any] | None, section: str) -> ConfigT:
    """``config_class(**values)`` with a ValueError naming the unknown keys of ``section`` (e.g. 'model.loss')."""
    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; expected some of {known}")
    return config_class(**values)


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

