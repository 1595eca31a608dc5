"""The per-scale metrics of one batch, for tests."""

from __future__ import annotations

from typing import Sequence

import torch

from varlib.evaluation.per_scale import PerScaleAccumulator


def per_scale_metrics(logits_BLV: torch.Tensor, targets_BL: torch.Tensor,
                      patch_nums: Sequence[int]) -> dict[str, float]:
    """The per-scale metrics of one batch (see :class:`varlib.evaluation.per_scale.PerScaleAccumulator`)."""
    acc = PerScaleAccumulator(patch_nums)
    acc.update(logits_BLV, targets_BL)
    return acc.compute()
