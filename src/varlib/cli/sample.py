"""``varlib-sample``: class- or text-conditional sampling from a VAR model into PNG files and a grid.

Writes ``{out_dir}/{index:05d}_class{label}.png`` for every image and ``{out_dir}/grid.png``. With
``labels=null`` the run draws ``per_class`` images of every class with
:func:`varlib.models.sampling.sample_per_class` (the seed scheme of ``make demo``) and the grid has one row per
class. Labels may be class names when the model file carries them (``labels='[cat, dog]'``); the log
then names the grid's cells. A text-conditional model samples ``prompts`` instead (``prompts='[red heart, cat
face]'``): ``per_class`` images of each, written as ``{index:05d}_prompt{i}.png``, one grid row per prompt, guidance
steering away from ``negative`` when given. Sampling settings left null are the model's own (``VAR.generate``'s
defaults). Configuration: ``conf/sample.yaml``; every key can be overridden on the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from varlib.cli.common import (
    CONFIG_PATH,
    generate_in_batches,
    load_var_model,
    parse_labels,
    resolve_device,
    run_or_exit,
    sampling_options,
)
from varlib.data.base import check_int_at_least
from varlib.images import image_grid, save_png
from varlib.inference import inference_precision, resolve_precision
from varlib.models.conditioning import TextConditioning
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


def run(cfg: DictConfig) -> SampleResult:
    """Samples the configured labels (or ``per_class`` of every class) and writes the PNGs (see the module
    docstring)."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    if isinstance(var.conditioning, TextConditioning):
        return sample_prompts(cfg, var)
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


def sample_prompts(cfg: DictConfig, var: VAR) -> SampleResult:
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


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
