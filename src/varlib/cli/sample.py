"""``varlib-sample``: class-conditional sampling from a VAR model into PNG files and a grid.

Writes ``{out_dir}/{index:05d}_class{label}.png`` for every image and ``{out_dir}/grid.png``. With
``labels=null`` the run draws ``per_class`` images of every class and the grid has one row per class.
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
    check_sampling_options,
    generate_in_batches,
    load_var_model,
    parse_labels,
    resolve_device,
    resolve_precision,
    run_or_exit,
)
from varlib.images import image_grid, save_png

logger = logging.getLogger(__name__)
MAX_GRID_COLUMNS = 8


@dataclass
class SampleResult:
    """What a sampling run wrote: the grid, the single images (in label order) and their labels."""

    grid_path: Path
    image_paths: list[Path]
    labels: list[int]


def run(cfg: DictConfig) -> SampleResult:
    """Samples the configured labels batch by batch and writes the PNGs (see the module docstring)."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    labels = parse_labels(cfg.labels, var.num_classes, cfg.per_class)
    options = check_sampling_options(cfg, var.vocab_size)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    images, paths = [], []
    for images_BCHW, batch_labels in generate_in_batches(var, labels, cfg.batch_size, cfg.seed, options,
                                                          precision=cfg.precision):
        for image, label in zip(images_BCHW, batch_labels):
            paths.append(save_png(image, out_dir / f"{len(paths):05d}_class{label}.png"))
        images.append(images_BCHW)

    columns = cfg.grid_columns
    if columns is None:
        columns = cfg.per_class if cfg.labels is None else min(MAX_GRID_COLUMNS, len(labels))
    grid_path = save_png(image_grid(torch.cat(images), columns, cfg.grid_padding), out_dir / "grid.png")
    logger.info("wrote %d images and %s", len(paths), grid_path)
    return SampleResult(grid_path=grid_path, image_paths=paths, labels=labels)


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
