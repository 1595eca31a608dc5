"""VAR's training objective, next to the model so that training and held-out evaluation share it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy (B, L) in fp32."""
    B, L, V = logits_BLV.shape
    ce = F.cross_entropy(logits_BLV.float().view(-1, V), targets_BL.reshape(-1), label_smoothing=label_smoothing,
                         reduction="none")
    return ce.view(B, L)
