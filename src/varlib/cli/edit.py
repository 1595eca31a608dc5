"""``varlib-edit``: zero-shot editing of one image with a VAR model (the paper's in-/out-painting).

The region to regenerate is either a mask image or a box:

* ``mask``: a greyscale/RGB image where WHITE (grey >= 128) marks pixels to regenerate and BLACK pixels
  to keep (transparent pixels count as white, as the robust loader composites on white). It has the
  input image's size, and is then resized and centre-cropped exactly like the image (nearest
  neighbour), or it is already at the model's resolution.
* ``box: [y0, x0, y1, x1]``: fractions of the cropped image; ``mode=inpaint`` regenerates the box,
  ``mode=outpaint`` regenerates everything outside it.

The model works on the final token grid: a token is regenerated when at most half of its pixels are
kept. ``label=null`` edits unconditionally (the null class). Configuration: ``conf/edit.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from varlib.cli.common import (
    CONFIG_PATH,
    check_sampling_options,
    inference_precision,
    load_var_model,
    model_resolution,
    parse_label,
    resolve_device,
    resolve_precision,
    run_or_exit,
)
from varlib.data import ImageTransform, decode_rgb_image
from varlib.images import save_png
from varlib.models.editing import box_keep_mask, token_grid_mask

logger = logging.getLogger(__name__)
EDIT_MODES = ("inpaint", "outpaint")
WHITE_THRESHOLD = 128


@dataclass
class EditResult:
    """The written image and the pixel keep-mask (R,R) that was used (1 = kept from the input)."""

    path: Path
    keep_mask: torch.Tensor


def read_image(path: str | Path, what: str) -> Image.Image:
    """An RGB PIL image; missing files raise FileNotFoundError, undecodable ones ValueError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: expected an image file at {path}, got nothing there")
    return decode_rgb_image(path)


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


def keep_mask_from_box(box: Sequence[float], mode: str, side: int) -> torch.Tensor:
    """``box = [y0, x0, y1, x1]`` fractions and ``mode`` in EDIT_MODES -> keep-mask (side, side), 1 = keep."""
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
    values = list(box)
    if len(values) != 4:
        raise ValueError(f"box must be [y0, x0, y1, x1] (4 fractions), got {values}")
    return box_keep_mask(side, tuple(float(v) for v in values), inpainting=mode == "inpaint")


def run(cfg: DictConfig) -> EditResult:
    """Loads the model and image, builds the keep-mask, edits, and writes ``cfg.out`` (see module docstring)."""
    if (cfg.mask is None) == (cfg.box is None):
        raise ValueError(f"give exactly one region to regenerate, mask=<image> or box=[y0,x0,y1,x1]; "
                         f"got mask={cfg.mask!r} and box={cfg.box!r}")
    image = read_image(cfg.image, "image")
    mask = None if cfg.mask is None else read_image(cfg.mask, "mask")
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    label = parse_label(cfg.label, var.num_classes)
    options = check_sampling_options(cfg, var.vocab_size)
    transform = ImageTransform(model_resolution(var), train=False)

    if mask is not None:
        keep_HW = keep_mask_from_image(mask, image.size, transform)
    else:
        keep_HW = keep_mask_from_box(cfg.box, cfg.mode, transform.resolution)
    side = var.patch_nums[-1]
    # The sampler keeps a last-scale token when its kept share is > 0.5 (varlib.models.editing).
    regenerated = token_grid_mask(keep_HW, side).le(0.5)
    if not regenerated.any():
        raise ValueError(
            f"the region to regenerate covers no token: expected at least one {var.vae.downsample}x"
            f"{var.vae.downsample}-pixel token of the {side}x{side} grid to be at least half regenerated"
        )

    image_13HW = transform(image).unsqueeze(0).to(device)
    with inference_precision(cfg.precision, device):
        edited_13HW = var.edit(image_13HW, keep_HW.to(device), [label], seed=cfg.seed, **options)
    path = save_png(edited_13HW[0].float().cpu(), cfg.out)
    logger.info("wrote %s (%d of %d tokens regenerated)", path, int(regenerated.sum()), side * side)
    return EditResult(path=path, keep_mask=keep_HW)


@hydra.main(config_path=CONFIG_PATH, config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
