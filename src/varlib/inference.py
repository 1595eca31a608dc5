"""What the command-line tools and the app share when they run a model: the device, the inference precision, a
model's image resolution, and the pixel masks of editing (a drawn or uploaded mask cropped like its image, the tokens it
regenerates)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from varlib.data import ImageTransform
from varlib.models.editing import token_grid_mask
from varlib.models.transformer import VAR

#: The ``precision`` settings of the inference tools.
PRECISIONS = ("auto", "fp32", "bf16")
#: Mask pixels at least this grey (of 255) mark pixels to regenerate.
WHITE_THRESHOLD = 128


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; any other torch device string is used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available (use device=cpu or auto)")
    return device


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """The device of process ``rank``: with several processes, a CUDA device without an index becomes
    ``cuda:LOCAL_RANK`` (torchrun sets it; else ``rank``) modulo the visible GPUs; any other device as given."""
    if device.type == "cuda" and device.index is None and world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; 'fp32' and 'bf16' as given."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


@contextmanager
def inference_precision(name: str, device: torch.device) -> Iterator[str]:
    """Runs the block in the resolved precision (yielded): fp32 as is; bf16 under bf16 autocast with TF32
    for the matrix multiplies autocast leaves in fp32 (restored afterwards). The tokenizer's nearest-code
    search always runs in fp32."""
    resolved = resolve_precision(name, device)
    if resolved == "fp32":
        yield resolved
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield resolved
    finally:
        torch.set_float32_matmul_precision(previous)


def model_resolution(var: VAR) -> int:
    """Image side in pixels for the VAR's own schedule (last patch number x tokenizer downsampling)."""
    return var.patch_nums[-1] * var.vae.downsample


def crop_mask_like_image(mask: Image.Image, transform: ImageTransform) -> Image.Image:
    """Resizes the mask (shorter side to ``transform.resize_to``, nearest) and centre-crops it, with the
    same sizes and offsets that ``transform`` applies to an image of the mask's size."""
    width, height = mask.size
    # Same size arithmetic as varlib.data.transforms.resize_shorter_side (torchvision's truncation).
    if width <= height:
        size = (transform.resize_to, int(transform.resize_to * height / width))
    else:
        size = (int(transform.resize_to * width / height), transform.resize_to)
    resized = mask.resize(size, Image.Resampling.NEAREST)
    return resized.crop(transform.crop_box(*resized.size))


def keep_mask_from_image(mask: Image.Image, image_size: tuple[int, int], transform: ImageTransform) -> torch.Tensor:
    """Mask image (white = regenerate) -> keep-mask (R,R) float in {0,1}, 1 = keep, aligned with the crop.

    Raises ValueError unless the mask is (W,H) of the input image or (R,R) of the model.
    """
    side = transform.resolution
    if mask.size == image_size:
        mask = crop_mask_like_image(mask, transform)
    elif mask.size != (side, side):
        raise ValueError(
            f"mask size (width, height) = {mask.size} must equal the image size {image_size} "
            f"or the model resolution {(side, side)}"
        )
    grey_HW = np.asarray(mask.convert("L"))
    return torch.from_numpy(grey_HW < WHITE_THRESHOLD).float()


def regenerated_tokens(keep_HW: torch.Tensor, var: VAR) -> torch.Tensor:
    """The last-scale tokens a pixel keep-mask (R,R) regenerates: (1, side, side) bool. The sampler keeps a token
    when its kept share is > 0.5 (varlib.models.editing). Raises ValueError when no token is regenerated."""
    side = var.patch_nums[-1]
    regenerated = token_grid_mask(keep_HW, side).le(0.5)
    if not regenerated.any():
        raise ValueError(
            f"the region to regenerate covers no token: expected at least one {var.vae.downsample}x"
            f"{var.vae.downsample}-pixel token of the {side}x{side} grid to be at least half regenerated"
        )
    return regenerated
