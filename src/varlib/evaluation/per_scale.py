"""The paper's per-scale metrics: cross-entropy and token error, averaged over all scales and on the last.

L_avg / Err_avg average over every token of every scale (uniform per token, as the training loss);
L_last / Err_last only over the last (finest) scale. Errors are in percent, as in the paper.
"""

from __future__ import annotations

from typing import Sequence

import torch

from varlib.models.losses import token_cross_entropy
from varlib.models.patch_schedules import scale_slices


class PerScaleAccumulator:
    """Sums per-scale cross-entropy and token errors over batches (for held-out evaluation).

    ``update`` takes unsmoothed logits (B,L',V) and targets (B,L'); ``compute`` returns loss_avg, loss_last,
    err_avg, err_last (percent) and loss_s{k}/err_s{k} for every scale seen.
    """

    def __init__(self, patch_nums: Sequence[int]):
        self.slices = scale_slices(patch_nums)
        self.sums = torch.zeros(3, len(self.slices), dtype=torch.float64)  # ce, wrong, count per scale

    @torch.no_grad()
    def update(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor, ce_BL: torch.Tensor | None = None) -> None:
        """Adds a batch; ``ce_BL`` may pass an already computed unsmoothed per-token cross-entropy."""
        ce_BL = token_cross_entropy(logits_BLV, targets_BL) if ce_BL is None else ce_BL.detach().float()
        wrong_BL = (logits_BLV.argmax(dim=-1) != targets_BL).float()
        active = [sl for sl in self.slices if sl.start < ce_BL.shape[1]]
        batch = torch.stack([
            torch.stack([ce_BL[:, sl].sum() for sl in active]),
            torch.stack([wrong_BL[:, sl].sum() for sl in active]),
            torch.tensor([float(ce_BL[:, sl].numel()) for sl in active], device=ce_BL.device),
        ]).double()
        self.sums = self.sums.to(batch.device)
        self.sums[:, : len(active)] += batch

    def compute(self) -> dict[str, float]:
        ce_sum, wrong, count = self.sums.cpu().unbind(0)
        seen = count > 0
        if not seen.any():
            raise ValueError("no tokens were accumulated")
        last = int(seen.nonzero().max())
        out = {
            "loss_avg": float(ce_sum[seen].sum() / count[seen].sum()),
            "loss_last": float(ce_sum[last] / count[last]),
            "err_avg": float(100 * wrong[seen].sum() / count[seen].sum()),
            "err_last": float(100 * wrong[last] / count[last]),
        }
        for k in range(last + 1):
            out[f"loss_s{k}"] = float(ce_sum[k] / count[k])
            out[f"err_s{k}"] = float(100 * wrong[k] / count[k])
        return out
