"""``varlib-tokenize``: encode a dataset into multi-scale token maps (``varlib.data.token_cache``).

The DataModule comes from the ``data`` config group and is built at the tokenizer's resolution. Both
splits are read deterministically: in order, without dropping the last batch, and with the centre-crop
evaluation transform, because a cache is written once and reused for every epoch (random crops frozen
into it would be one arbitrary draw; use ``with_flip`` for the one augmentation the cache supports).
Configuration: ``conf/tokenize.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from varlib.cli.common import CONFIG_PATH, instantiate_config, load_tokenizer, resolve_device, run_or_exit
from varlib.data import ImageDataModule, ImageTransform, WebDatasetDataModule
from varlib.data.base import check_int_at_least
from varlib.data.shards import CountingHandler, ShardSampleDecoder, shard_pipeline
from varlib.data.token_cache import read_index, tokenize_to_cache
from varlib.models.schedules import validate_patch_nums

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass
class TokenizeResult:
    """The cache folder and how many images each split holds."""

    out_dir: Path
    counts: dict[str, int]


def deterministic_loader(datamodule: ImageDataModule, split: str, resolution: int) -> DataLoader:
    """The split's images in a fixed order with the centre-crop transform: batches (images (B,3,R,R), labels (B,))."""
    transform = ImageTransform(resolution, train=False)
    if isinstance(datamodule, WebDatasetDataModule):
        urls = datamodule.train_urls if split == "train" else datamodule.val_urls
        if urls is None:
            raise ValueError(f"split {split!r} needs data.val_urls, got null (or leave it out of splits)")
        decoder = ShardSampleDecoder(transform, datamodule.num_classes, datamodule.label_key, datamodule.image_keys)
        pipeline = shard_pipeline(urls, decoder, CountingHandler(datamodule.skip_counters[split]), train=False)
        return datamodule.make_loader(pipeline, train=False)
    datamodule.setup("fit")
    dataset = getattr(datamodule, f"{split}_set", None)
    if dataset is None or not hasattr(dataset, "transform"):
        raise ValueError(f"expected {type(datamodule).__name__} to hold a map-style {split}_set with a transform "
                         f"after setup, got {type(dataset).__name__}")
    dataset.transform = transform
    return datamodule.make_loader(dataset, train=False)


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
    device = resolve_device(cfg.device)
    requested = None if cfg.patch_nums is None else validate_patch_nums(list(cfg.patch_nums))
    vae, patch_nums = load_tokenizer(cfg.tokenizer, device, requested)
    resolution = patch_nums[-1] * vae.downsample
    if "image_size" not in cfg.data:
        raise ValueError(f"data must be an image dataset config with an image_size (emoji, imagefolder, webdataset), "
                         f"got {cfg.data.get('_target_')}")
    if cfg.data.image_size != resolution:
        logger.info("data.image_size=%s replaced by the tokenizer's resolution %d", cfg.data.image_size, resolution)
    datamodule = instantiate_config(cfg.data, image_size=resolution)
    if not isinstance(datamodule, ImageDataModule):
        raise ValueError(f"data must build a varlib ImageDataModule, got {type(datamodule).__name__}")
    if datamodule.hflip:
        logger.info("data.hflip is ignored: the cache stores unflipped images (with_flip=true adds mirrored twins)")
    check_existing_cache(Path(cfg.out_dir), patch_nums, vae.vocab_size, datamodule.num_classes)

    counts = {}
    for split in splits:
        loader = deterministic_loader(datamodule, split, resolution)
        counts[split] = tokenize_to_cache(vae, loader, cfg.out_dir, split, datamodule.num_classes, patch_nums,
                                          with_flip=cfg.with_flip, shard_size=cfg.shard_size)
        logger.info("%s: %d images tokenised", split, counts[split])
    if datamodule.skipped:
        logger.warning("%d unreadable images were skipped", datamodule.skipped)
    return TokenizeResult(out_dir=Path(cfg.out_dir), counts=counts)


@hydra.main(config_path=CONFIG_PATH, config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
