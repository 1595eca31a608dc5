"""Zero-shot editing masks: which ground-truth tokens to keep at every scale (the official method).

A mask is given on the final token grid (H x W = last patch number), 1 = keep the ground truth,
0 = let the model generate. At scale k it is resized bilinearly (align_corners=False) and thresholded at
0.5; scales with at most 3 tokens (the 1x1 scale) are kept entirely.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: How a box marks the region to regenerate: in-painting regenerates the box, out-painting everything outside it.
EDIT_MODES = ("inpaint", "outpaint")


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


def keep_mask_from_box(box: Sequence[float], mode: str, side: int) -> torch.Tensor:
    """``box = [y0, x0, y1, x1]`` fractions and ``mode`` in EDIT_MODES -> keep-mask (side, side), 1 = keep."""
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
    values = list(box)
    if len(values) != 4:
        raise ValueError(f"box must be [y0, x0, y1, x1] (4 fractions), got {values}")
    return box_keep_mask(side, tuple(float(v) for v in values), inpainting=mode == "inpaint")


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


def token_grid_mask(keep_mask: torch.Tensor, side: int) -> torch.Tensor:
    """A keep-mask at any resolution (H,W) or (B,H,W) -> the final token grid (B, side, side) in [0,1].

    Masks already at the token grid pass through unchanged; larger ones (e.g. at image resolution) are
    area-averaged, so a token is kept when most of its pixels are.
    """
    mask = keep_mask.float()
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"expected a keep mask of shape (H, W) or (B, H, W), got {tuple(keep_mask.shape)}")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1 = keep), got [{mask.min():.3g}, {mask.max():.3g}]")
    if mask.shape[-2:] != (side, side):
        if mask.shape[-1] % side or mask.shape[-2] % side:
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} must be a multiple of the token grid {side}x{side}")
        mask = F.interpolate(mask.unsqueeze(1), size=(side, side), mode="area").squeeze(1)
    return mask
