"""Per-step seeding of a training run's random draws, so that a resumed run draws what an uninterrupted one did."""

from __future__ import annotations

import lightning as L
import torch


def seed_training_step(module: L.LightningModule, seed: int) -> None:
    """Seeds torch's RNGs (CPU and every device) for the module's next training step with
    ``seed + global_step * world_size + global_rank``: the draws depend only on the step and the rank, not on what
    ran before (a resumed run replays them), and the ranks of one step draw differently."""
    torch.manual_seed(seed + module.global_step * module.trainer.world_size + module.global_rank)
