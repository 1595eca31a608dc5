"""Image helpers shared by training, evaluation, the command-line tools and notebooks: pixel converters,
tiling grids and writing PNGs. Light on purpose (torch and PIL only).

Images here are float tensors in [0, 1] with shape (3, H, W) or (B, 3, H, W) unless a name says otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def check_uint8_images(images, channels_last: bool = False) -> None:
    """Raise ValueError unless ``images`` are uint8 RGB images: a torch tensor (B,3,H,W), or with ``channels_last``
    a numpy array (N,H,W,3) (the ADM ``.npz`` layout)."""
    array_type, dtype, channel_dim, shape = ((np.ndarray, np.uint8, 3, "(N,H,W,3)") if channels_last
                                             else (torch.Tensor, torch.uint8, 1, "(B,3,H,W)"))
    if not isinstance(images, array_type):
        raise ValueError(f"expected a {array_type.__module__}.{array_type.__name__} of uint8 images {shape}, got "
                         f"{type(images).__name__}")
    if images.dtype != dtype:
        raise ValueError(f"expected uint8 images in [0,255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[channel_dim] != 3:
        raise ValueError(f"expected images of shape {shape}, got {tuple(images.shape)}")


def unit_float_to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (B,3,H,W) -> uint8 in [0, 255] (values outside are clamped)."""
    return (images_BCHW.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def signed_float_to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B,3,H,W) -> uint8 in [0, 255] (values outside are clamped)."""
    return unit_float_to_uint8((images_BCHW.float() + 1.0) / 2.0)


def to_pil(image_3HW: torch.Tensor) -> Image.Image:
    """Float image (3,H,W) in [0,1] (clamped) -> RGB PIL image, rounding to 8 bits."""
    if image_3HW.ndim != 3 or image_3HW.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image_3HW.shape)}")
    pixels_HWC = unit_float_to_uint8(image_3HW).permute(1, 2, 0)
    return Image.fromarray(pixels_HWC.cpu().numpy(), mode="RGB")


def save_png(image_3HW: torch.Tensor, path: str | Path) -> Path:
    """Writes a (3,H,W) image in [0,1] as an 8-bit PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image_3HW).save(path, format="PNG")
    return path


def image_grid(images_BCHW: torch.Tensor, columns: int, padding: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Tiles B images (B,3,H,W) row by row into (3, rows*(H+p)+p, columns*(W+p)+p), p = padding.

    rows = ceil(B / columns); empty cells and the padding have the value ``fill``.
    """
    if images_BCHW.ndim != 4 or images_BCHW.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (B,3,H,W), got {tuple(images_BCHW.shape)}")
    if columns < 1 or padding < 0:
        raise ValueError(f"expected columns >= 1 and padding >= 0, got {columns} and {padding}")
    count, channels, height, width = images_BCHW.shape
    rows = math.ceil(count / columns)
    grid = images_BCHW.new_full((channels, rows * (height + padding) + padding,
                                 columns * (width + padding) + padding), fill)
    for index, image in enumerate(images_BCHW):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid
