"""The training settings (the ``model.optim`` and ``model.loss`` config nodes of every module) as frozen dataclasses
that check their values, and :func:`build_config`, which builds one from a config node."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from varlib.training.optim_schedules import LR_DECAYS

#: The discriminator losses ``TokenizerLossConfig.disc_loss`` names (their functions: varlib.training.tokenizer_loss).
DISC_LOSS_NAMES = ("hinge", "vanilla")

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
        if self.disc_loss not in DISC_LOSS_NAMES:
            raise ValueError(f"loss.disc_loss must be one of {list(DISC_LOSS_NAMES)}, got {self.disc_loss!r}")
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


@dataclass(frozen=True)
class RecipeOptimConfig:
    """The official optimisation recipe (``model.optim``): what the module computes around the optimiser that
    ``model.optimizer`` builds.

    lr: the peak learning rate, as the tokenizer's ``optim.lr`` (the official recipe scales 1e-4 per 256 images
        of global batch: 3e-4 at its 768).
    weight_decay, weight_decay_end: the decay of the weight matrices' parameter group (official 0.05, constant;
        norms, biases and embeddings take none); weight_decay_end, when given, is reached by a cosine over
        training (official d30/d36: 0.08).
    warmup_fraction, warmup_start, end_factor, flat_fraction: the 'lin0' schedule (official warm-up is 1/50 of
        training, end_factor 0.01; the README trains d16/d20 with 0.1).
    grad_clip: max global gradient norm (official 2.0; None disables, as for the tokenizer), also on sharded
        (FSDP2) parameters.
    """

    lr: float = 3e-4
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    warmup_fraction: float = 0.02
    warmup_start: float = 0.005
    end_factor: float = 0.01
    flat_fraction: float = 0.05
    grad_clip: float | None = 2.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"expected optim.lr > 0 and optim.warmup_fraction in [0, 1); "
                             f"got {self.lr}, {self.warmup_fraction}")
        if self.grad_clip is not None:
            _check_number("optim.grad_clip", self.grad_clip, strict=True)


@dataclass(frozen=True)
class TokenLossConfig:
    """The loss (``model.loss``): cross-entropy label smoothing (official 0)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"expected loss.label_smoothing in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class VARLossConfig(TokenLossConfig):
    """VAR's loss (``model.loss``): label smoothing and progressive training, which grows the trained scales
    from ``progressive_first`` to all by ``progressive_fraction`` of training (0 = off, official default)."""

    progressive_fraction: float = 0.0
    progressive_first: int = 4
