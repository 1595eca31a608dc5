"""Zero-shot editing masks: which ground-truth tokens to keep at every scale (the official method).

A mask is given on the final token grid (H x W = last patch number), 1 = keep the ground truth,
0 = let the model generate. At scale k it is resized bilinearly (align_corners=False) and thresholded at
0.5; scales with at most 3 tokens (the 1x1 scale) are kept entirely.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def box_keep_mask(
    side: int, box: tuple[float, float, float, float], inpainting: bool = True
) -> torch.Tensor:
    """A keep-mask (side, side) for a box (y0, x0, y1, x1) given as fractions of the image.

    In-painting regenerates the box (keep outside), out-painting keeps only the box. The box covers rows
    round(y0*side):round(y1*side) and the same for columns.
    """
    y0, x0, y1, x1 = box
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f"box must be fractions with 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1, got {box}")
    inside = torch.zeros(side, side)
    inside[round(y0 * side):round(y1 * side), round(x0 * side):round(x1 * side)] = 1
    return 1 - inside if inpainting else inside


def keep_masks_per_scale(keep_BHW: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Resizes a keep-mask (H,W) or (B,H,W) in [0,1] to every scale: K bool tensors (B, pn, pn)."""
    if keep_BHW.ndim == 2:
        keep_BHW = keep_BHW.unsqueeze(0)
    if keep_BHW.ndim != 3:
        raise ValueError(f"expected a keep mask of shape (H, W) or (B, H, W), got {tuple(keep_BHW.shape)}")
    masks = []
    for pn in patch_nums:
        resized = F.interpolate(keep_BHW.unsqueeze(1).float(), size=(pn, pn), mode="bilinear", align_corners=False)
        keep = resized.squeeze(1).gt(0.5)
        masks.append(torch.ones_like(keep) if pn * pn <= 3 else keep)
    return masks
