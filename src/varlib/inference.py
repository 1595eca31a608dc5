"""What the command-line tools and the app share when they run a model: the device, the inference precision, a
model's image resolution, and the keep-mask of an edit (:func:`edit_keep_mask`: from a mask image cropped like its
image, or from a box) with the tokens it regenerates."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from varlib.data import ImageTransform
from varlib.models.editing import box_keep_mask, token_grid_mask
from varlib.models.transformer import VAR

#: The ``precision`` settings of the inference tools.
PRECISIONS = ("auto", "fp32", "bf16")
#: Mask pixels at least this grey (of 255) mark pixels to regenerate.
WHITE_THRESHOLD = 128
#: What an edit regenerates: the region (in-painting) or everything outside it (out-painting).
EDIT_MODES = ("inpaint", "outpaint")


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
    """Runs the block in the resolved precision (yielded): fp32 in true fp32, without TF32 in matrix multiplies or
    cuDNN convolutions (cuDNN's is on by default: on Ampere and newer GPUs the tokenizer's convolutions would
    round, and fp32 would not give exactly the fp32 tokens); bf16 under bf16 autocast with TF32 for the matrix
    multiplies autocast leaves in fp32. Both restore the settings afterwards. The tokenizer's nearest-code
    search always runs in fp32."""
    resolved = resolve_precision(name, device)
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    if resolved == "fp32":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield resolved
        finally:
            torch.set_float32_matmul_precision(previous[0])
            torch.backends.cudnn.allow_tf32 = previous[1]
        return
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield resolved
    finally:
        torch.set_float32_matmul_precision(previous[0])


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


def edit_keep_mask(transform: ImageTransform, mode: str, *, mask: Image.Image | None = None,
                   image_size: tuple[int, int] | None = None, box: Sequence[float] | None = None) -> torch.Tensor:
    """The pixel keep-mask (R,R) of an edit, float in {0,1}, 1 = keep, on the image as ``transform`` crops it: the
    region is a ``mask`` image (white = the region; of the input image's size ``image_size`` (W,H), cropped like
    it, or of the model's (R,R); see :func:`keep_mask_from_image`) or a ``box`` [y0, x0, y1, x1] of fractions of
    the cropped image; ``mode`` (:data:`EDIT_MODES`) "inpaint" regenerates the region, "outpaint" the rest."""
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
    if (mask is None) == (box is None):
        raise ValueError(f"give exactly one region to regenerate, mask=<image> or box=[y0,x0,y1,x1]; "
                         f"got mask={mask!r} and box={box!r}")
    if mask is not None:
        keep_HW = keep_mask_from_image(mask, image_size, transform)
        return keep_HW if mode == "inpaint" else 1 - keep_HW
    values = list(box)
    if len(values) != 4:
        raise ValueError(f"box must be [y0, x0, y1, x1] (4 fractions), got {values}")
    return box_keep_mask(transform.resolution, tuple(float(v) for v in values), inpainting=mode == "inpaint")
