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
import torch
from omegaconf import DictConfig
from PIL import Image

from varlib.cli.common import (
    CONFIG_PATH,
    load_var_model,
    parse_label,
    resolve_device,
    run_or_exit,
    sampling_options,
)
from varlib.data import ImageTransform, decode_rgb_image
from varlib.images import save_png
from varlib.inference import (
    inference_precision,
    keep_mask_from_image,
    model_resolution,
    regenerated_tokens,
    resolve_precision,
)
from varlib.models.editing import box_keep_mask

logger = logging.getLogger(__name__)
EDIT_MODES = ("inpaint", "outpaint")


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
    options = sampling_options(cfg, var)
    transform = ImageTransform(model_resolution(var), train=False)

    if mask is not None:
        keep_HW = keep_mask_from_image(mask, image.size, transform)
    else:
        keep_HW = keep_mask_from_box(cfg.box, cfg.mode, transform.resolution)
    regenerated = regenerated_tokens(keep_HW, var)
    side = var.patch_nums[-1]

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
