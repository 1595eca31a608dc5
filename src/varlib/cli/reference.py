"""``varlib-reference``: the reference statistics file of FID/IS in training (``GenerationMetricsCallback``).

    varlib-reference data=imagefolder data.root=/datasets/imagenet data.image_size=256 out=imagenet256_ref.npz
    varlib-reference data=webdataset data.val_urls='/data/in-wds/val-{000..063}.tar' data.image_size=256 out=ref.npz

Reads the validation split of a data config (image folders or WebDataset shards), passes every image through
the feature extractor (``inception._target_``; any ``varlib.evaluation.FeatureExtractor``) and writes
``mu``/``sigma`` over all of them plus a uniform sample of ``keep_images`` images (``arr_0``): the ADM reference
batch layout (:func:`varlib.evaluation.reference.write_data_reference`). Configuration: ``conf/reference.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.evaluation.reference import write_data_reference


@hydra.main(config_path=CONFIG_PATH, config_name="reference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(write_data_reference, cfg)


if __name__ == "__main__":
    main()
