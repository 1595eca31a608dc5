"""``varlib-tokenize``: encode a dataset into multi-scale token maps (``varlib.data.token_cache``).

The DataModule comes from the ``data`` config group and is built at the tokenizer's resolution. Splits are
read in order, without dropping the last batch, with the centre-crop evaluation transform, or with ``crops``
random crops per image (the official random-crop augmentation, frozen into ``crops`` draws seeded per shard;
training then picks one per step); ``with_flip`` adds mirrored twins. A captioned dataset (``data.captions=true``)
has its captions kept beside the tokens, and with a frozen ``text_encoder`` their features too (its weights saved
beside them, so that a text VAR trained on them encodes prompts alike). Several processes share the work:

    torchrun --nproc-per-node 8 -m varlib.cli.tokenize tokenizer=vae.pth data=imagefolder data.root=... out_dir=...

Each process (RANK of WORLD_SIZE, on cuda:LOCAL_RANK with device=auto) writes every WORLD_SIZE-th shard; a
re-run skips finished shards (see ``varlib.data.tokenizing``). Configuration: ``conf/tokenize.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from varlib.cli.common import (
    CONFIG_PATH,
    rank_device,
    resolve_device,
    run_or_exit,
)
from varlib.configs import datamodule_config, instantiate_config
from varlib.data import ImageDataModule, ImageTransform
from varlib.data.base import check_int_at_least
from varlib.data.token_cache import CLASS_NAMES_FILE, read_index
from varlib.data.tokenizing import distributed_rank, tokenize_split, write_text_encoder
from varlib.data.transforms import MultiCropTransform
from varlib.inference import inference_precision, resolve_precision
from varlib.io import load_tokenizer
from varlib.models.patch_schedules import validate_patch_nums
from varlib.models.text import build_text_encoder

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass
class TokenizeResult:
    """The cache folder, and for this process how many images each split got and how many were skipped."""

    out_dir: Path
    counts: dict[str, int]
    skipped: dict[str, int]


def check_existing_cache(out_dir: Path, patch_nums: tuple[int, ...], vocab_size: int, num_classes: int) -> None:
    """Adding splits to an existing cache is fine only when it was written with the same schedule and classes."""
    if not (out_dir / "index.json").is_file():
        return
    index = read_index(out_dir)
    existing = (tuple(index["patch_nums"]), index["vocab_size"], index["num_classes"])
    if existing != (patch_nums, vocab_size, num_classes):
        raise ValueError(
            f"{out_dir} already holds a token cache with (patch_nums, vocab_size, num_classes) = {existing}; "
            f"this run writes {(patch_nums, vocab_size, num_classes)}: choose another out_dir"
        )


def run(cfg: DictConfig) -> TokenizeResult:
    """Tokenises the configured splits into ``cfg.out_dir``; returns the per-split image counts."""
    splits = list(cfg.splits)
    if not splits or any(split not in SPLITS for split in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names among {list(SPLITS)}, got {splits}")
    check_int_at_least("shard_size", cfg.shard_size, 1)
    check_int_at_least("crops", cfg.crops, 1)
    rank, world_size = distributed_rank()
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    device = rank_device(device, rank, world_size)
    requested = None if cfg.patch_nums is None else validate_patch_nums(list(cfg.patch_nums))
    vae = load_tokenizer(cfg.tokenizer, requested).to(device)
    patch_nums = vae.patch_nums if requested is None else requested
    resolution = patch_nums[-1] * vae.downsample
    if "image_size" not in cfg.data:
        raise ValueError(f"data must be an image dataset config with an image_size (emoji, imagefolder, webdataset), "
                         f"got {cfg.data.get('_target_')}")
    if cfg.data.image_size != resolution:
        logger.info("data.image_size=%s replaced by the tokenizer's resolution %d", cfg.data.image_size, resolution)
    datamodule = instantiate_config(datamodule_config(cfg.data), image_size=resolution)
    if not isinstance(datamodule, ImageDataModule):
        raise ValueError(f"data must build a varlib ImageDataModule, got {type(datamodule).__name__}")
    if datamodule.hflip:
        logger.info("data.hflip is ignored: the cache stores unflipped images (with_flip=true adds mirrored twins)")
    check_existing_cache(Path(cfg.out_dir), patch_nums, vae.vocab_size, datamodule.num_classes)
    class_names = getattr(datamodule, "class_names", None)
    if rank == 0 and class_names is not None:  # training names the model's classes with them
        write_class_names(Path(cfg.out_dir), list(class_names))
    text_encoder = None
    if cfg.text_encoder is not None:
        torch.manual_seed(cfg.seed)  # a config-only encoder is random: every process draws the same weights
        text_encoder = build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True)).to(device).eval()
        if rank == 0:
            write_text_encoder(cfg.out_dir, text_encoder)

    transform = ImageTransform(resolution, train=False) if cfg.crops == 1 else MultiCropTransform(resolution, cfg.crops)
    counts, skipped = {}, {}
    for split in splits:
        units = datamodule.tokenizing_units(split, transform, cfg.shard_size)
        with inference_precision(cfg.precision, device):
            result = tokenize_split(vae, units, cfg.out_dir, split, datamodule.num_classes, patch_nums,
                                    with_flip=cfg.with_flip, crops=cfg.crops, seed=cfg.seed, rank=rank,
                                    world_size=world_size, captions=getattr(datamodule, "captions", False),
                                    text_encoder=text_encoder)
        counts[split], skipped[split] = result["written"], result["skipped"]
        logger.info("%s: %d images tokenised, %d skipped (unreadable or uncaptioned), %d finished shards kept "
                    "(process %d of %d)", split, result["written"], result["skipped"], result["resumed"], rank,
                    world_size)
    return TokenizeResult(out_dir=Path(cfg.out_dir), counts=counts, skipped=skipped)


def write_class_names(out_dir: Path, class_names: list[str]) -> None:
    """``out_dir/class_names.json`` (:data:`~varlib.data.token_cache.CLASS_NAMES_FILE`), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{CLASS_NAMES_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(class_names, indent=1))
    os.replace(partial, out_dir / CLASS_NAMES_FILE)


@hydra.main(config_path=CONFIG_PATH, config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
