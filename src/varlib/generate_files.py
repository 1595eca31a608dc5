"""What ``varlib-sample`` and ``varlib-edit`` run: sampling into PNG files (:func:`sample_to_files`) and editing one
image into a file (:func:`edit_to_file`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from varlib.data import ImageTransform, decode_rgb_image
from varlib.data.base import check_int_at_least
from varlib.generation import generate_in_batches, load_var_model, parse_label, parse_labels, sampling_options
from varlib.images import image_grid, save_png
from varlib.inference import (
    inference_precision,
    keep_mask_from_image,
    model_resolution,
    regenerated_tokens,
    resolve_device,
    resolve_precision,
)
from varlib.models.conditioning import TextConditioning
from varlib.models.editing import keep_mask_from_box
from varlib.models.sampling import class_indices, sample_per_class
from varlib.models.transformer import VAR

logger = logging.getLogger(__name__)
MAX_GRID_COLUMNS = 8


@dataclass
class SampleResult:
    """What a sampling run wrote: the grid, the single images (in label order) and their labels (a text model:
    their prompts, and no labels)."""

    grid_path: Path
    image_paths: list[Path]
    labels: list[int]
    prompts: list[str] = field(default_factory=list)


def sample_to_files(cfg: DictConfig) -> SampleResult:
    """``varlib-sample``: samples the configured labels (or ``per_class`` of every class) of a ``sample`` config and
    writes the PNGs (see :mod:`varlib.cli.sample`); a text model samples its prompts (:func:`prompts_to_files`)."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    if isinstance(var.conditioning, TextConditioning):
        return prompts_to_files(cfg, var)
    if cfg.prompts is not None or cfg.negative is not None:
        raise ValueError(f"prompts and negative are for a text-conditional model; this one is conditioned on "
                         f"{var.num_classes} classes (use labels), got prompts={cfg.prompts!r}, "
                         f"negative={cfg.negative!r}")
    requested = cfg.labels
    if requested is not None and not isinstance(requested, (int, str)):
        requested = list(requested)
    if isinstance(requested, str) or (isinstance(requested, list) and any(isinstance(x, str) for x in requested)):
        requested = class_indices(var, [requested] if isinstance(requested, str) else requested)
    labels = parse_labels(requested, var.num_classes, cfg.per_class)
    options = sampling_options(cfg, var)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.labels is None:
        check_int_at_least("batch_size", cfg.batch_size, 1)
        with inference_precision(cfg.precision, device):
            images = sample_per_class(var, cfg.per_class, cfg.seed, cfg.batch_size, **options).float()
    else:
        images = torch.cat([images for images, _ in generate_in_batches(var, labels, cfg.batch_size, cfg.seed,
                                                                         options, precision=cfg.precision)])
    paths = [save_png(image, out_dir / f"{index:05d}_class{label}.png")
             for index, (image, label) in enumerate(zip(images, labels))]

    columns = cfg.grid_columns
    if columns is None:
        columns = cfg.per_class if cfg.labels is None else min(MAX_GRID_COLUMNS, len(labels))
    grid_path = save_png(image_grid(images, columns, cfg.grid_padding), out_dir / "grid.png")
    logger.info("wrote %d images and %s", len(paths), grid_path)
    if var.class_names is not None:
        names = [var.class_names[label] if label < var.num_classes else "null" for label in labels]
        logger.info("grid cells in order (rows of %d): %s", columns, ", ".join(names))
    return SampleResult(grid_path=grid_path, image_paths=paths, labels=labels)


def prompts_to_files(cfg: DictConfig, var: VAR) -> SampleResult:
    """A text model's run: ``per_class`` images of each of ``cfg.prompts`` (batch i with seed + i), one grid row
    per prompt unless ``grid_columns`` says otherwise."""
    prompts = [cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts or [])
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"a text-conditional model samples prompts: expected prompts='[red heart, cat face]' (a "
                         f"non-empty list of non-empty prompts), got prompts={cfg.prompts!r}")
    if cfg.labels is not None:
        raise ValueError(f"a text-conditional model takes prompts, not labels, got labels={cfg.labels!r}")
    if cfg.negative is not None and not isinstance(cfg.negative, str):
        raise ValueError(f"negative must be one prompt (a str), got {cfg.negative!r}")
    check_int_at_least("per_class", cfg.per_class, 1)
    options = {**sampling_options(cfg, var), "negative": cfg.negative}
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [prompt for prompt in prompts for _ in range(cfg.per_class)]
    images = torch.cat([images for images, _ in generate_in_batches(var, rows, cfg.batch_size, cfg.seed, options,
                                                                     precision=cfg.precision)])
    numbers = [i for i in range(len(prompts)) for _ in range(cfg.per_class)]
    paths = [save_png(image, out_dir / f"{index:05d}_prompt{number}.png")
             for index, (image, number) in enumerate(zip(images, numbers))]
    columns = cfg.per_class if cfg.grid_columns is None else cfg.grid_columns
    grid_path = save_png(image_grid(images, columns, cfg.grid_padding), out_dir / "grid.png")
    logger.info("wrote %d images and %s; prompts in order (%d images each): %s", len(paths), grid_path,
                cfg.per_class, ", ".join(prompts))
    return SampleResult(grid_path=grid_path, image_paths=paths, labels=[], prompts=rows)


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


def edit_to_file(cfg: DictConfig) -> EditResult:
    """``varlib-edit``: loads the model and image of an ``edit`` config, builds the keep-mask, edits, and writes
    ``cfg.out`` (see :mod:`varlib.cli.edit`)."""
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
