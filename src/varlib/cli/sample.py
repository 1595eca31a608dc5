"""``varlib-sample``: class-conditional sampling from a VAR model into PNG files and a grid.

Writes ``{out_dir}/{index:05d}_class{label}.png`` for every image and ``{out_dir}/grid.png``. With
``labels=null`` the run draws ``per_class`` images of every class with
:func:`varlib.models.sampling.sample_per_class` (the seed scheme of ``make demo``) and the grid has one row per
class. Labels may be class names when the model file carries them (``labels='[cat, dog]'``); the log
then names the grid's cells. Sampling settings left null are the model's own (``VAR.generate``'s defaults).
Configuration: ``conf/sample.yaml``; every key can be overridden on the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
from varlib.models.sampling import class_indices, sample_per_class

logger = logging.getLogger(__name__)
MAX_GRID_COLUMNS = 8


@dataclass
class SampleResult:
    """What a sampling run wrote: the grid, the single images (in label order) and their labels."""

    grid_path: Path
    image_paths: list[Path]
    labels: list[int]


def run(cfg: DictConfig) -> SampleResult:
    """Samples the configured labels (or ``per_class`` of every class) and writes the PNGs (see the module
    docstring)."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
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


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
