"""Optimisation schedules as plain functions: the official VAR recipe (lin0 lr, cosine weight decay, no-decay groups,
progressive scales) and the tokenizer's learning rate (warm-up, then constant or cosine)."""

from __future__ import annotations

import math
import torch.nn as nn

#: Parameters whose names contain any of these get no weight decay (official list), as do all biases and
#: 1-D parameters.
NO_DECAY_NAMES = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)
#: The tokenizer's lr decays after warm-up (``model.optim.decay``).
LR_DECAYS = ("constant", "cosine")


def lin0_lr_factor(
    step: int, warmup_steps: int, total_steps: int, warmup_start: float = 0.005, end_factor: float = 0.01,
    flat_fraction: float = 0.05,
) -> float:
    """The official 'lin0' schedule as a factor of the peak lr.

    Linear warm-up from ``warmup_start`` to 1 over ``warmup_steps``; then flat for the first
    ``flat_fraction`` of the remaining steps; then linear decay to ``end_factor`` at the last step.
    """
    if step < warmup_steps:
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    span = max(total_steps - 1 - warmup_steps, 1)
    passed = min((step - warmup_steps) / span, 1.0)
    if passed < flat_fraction:
        return 1.0
    return end_factor + (1 - end_factor) * (1 - passed) / (1 - flat_fraction)


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay annealed from ``start`` to ``end`` along a half cosine over the whole run."""
    passed = min(step / max(total_steps - 1, 1), 1.0)
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * passed))


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: the official no-decay set (1-D params, biases, NO_DECAY_NAMES) and everything else."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith("bias") or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "base_weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "base_weight_decay": 0.0},
    ]


def progressive_num_scales(step: int, start_step: int, end_step: int, first: int, total: int) -> int:
    """Progressive training: how many scales are trained at ``step``, growing linearly from ``first`` at
    ``start_step`` to ``total`` at ``end_step``."""
    if end_step <= start_step or step >= end_step:
        return total
    if step <= start_step:
        return min(first, total)
    return min(total, first + int((total - first + 1) * (step - start_step) / (end_step - start_step)))


def lr_multiplier(
    step: int, warmup_steps: int, total_steps: int | None, decay: str, min_ratio: float,
    time_fraction: float | None = None,
) -> float:
    """Factor on the base learning rate at ``step`` (0-based): linear warm-up, then constant or cosine decay.

    The decay's progress is the share of the post-warm-up steps taken, or ``time_fraction`` (elapsed / allowed
    training time, warm-up included) when that is larger. With neither (``total_steps`` None or <=
    ``warmup_steps``, no ``time_fraction``) the rate stays constant after warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    fractions = [] if time_fraction is None else [time_fraction]
    if total_steps is not None and total_steps > warmup_steps:
        fractions.append((step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "constant" or not fractions:
        return 1.0
    progress = min(1.0, max(fractions))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
