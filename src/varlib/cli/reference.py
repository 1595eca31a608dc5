"""``varlib-reference``: the reference statistics file of FID/IS in training (``GenerationMetricsCallback``).

    varlib-reference data=imagefolder data.root=/datasets/imagenet data.image_size=256 out=imagenet256_ref.npz
    varlib-reference data=webdataset data.val_urls='/data/in-wds/val-{000..063}.tar' data.image_size=256 out=ref.npz

Reads the validation split of a data config (image folders or WebDataset shards), passes every image through
the feature extractor (``inception._target_``; any ``varlib.evaluation.FeatureExtractor``) and writes
``mu``/``sigma`` over all of them plus a uniform sample of ``keep_images`` images (``arr_0``): the ADM reference
batch layout (``varlib.evaluation.reference``). Configuration: ``conf/reference.yaml``.
"""

from __future__ import annotations

import logging
from itertools import islice

import hydra
from omegaconf import DictConfig

from varlib.cli.common import (
    CONFIG_PATH,
    resolve_device,
    run_or_exit,
)
from varlib.configs import datamodule_config, instantiate_config
from varlib.data.base import check_int_at_least, images_from_batch
from varlib.evaluation import ReferenceStatistics, write_reference
from varlib.images import signed_float_to_uint8

logger = logging.getLogger(__name__)


def run(cfg: DictConfig) -> ReferenceStatistics:
    """Writes ``cfg.out`` from ``cfg.data``'s validation images and returns what was written."""
    check_int_at_least("keep_images", cfg.keep_images, 0)
    datamodule = instantiate_config(datamodule_config(cfg.data))
    datamodule.setup("validate")
    extractor = instantiate_config(cfg.inception)
    batches = (signed_float_to_uint8(images_from_batch(batch)) for batch in datamodule.val_dataloader()
               if batch is not None)  # None: every sample of the batch was unreadable
    if cfg.max_batches is not None:
        batches = islice(batches, cfg.max_batches)
    written = write_reference(cfg.out, extractor, batches, resolve_device(cfg.device), cfg.keep_images, cfg.seed)
    logger.info("wrote %s: %d-d statistics, %d images kept", cfg.out, written.mu.shape[0],
                0 if written.images_NHWC is None else written.images_NHWC.shape[0])
    return written


@hydra.main(config_path=CONFIG_PATH, config_name="reference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
