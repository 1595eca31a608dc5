"""``varlib-evaluate``: generate the evaluation set (the paper's protocol) and score it.

Steps: draw ``num_per_class`` images of each class 0..num_classes-1 (batch i with seed + i), stream
them into a shuffled ADM ``.npz`` (``AdmNpzWriter``), and pass the same uint8 pixels through the feature
extractor (``inception._target_``, the ADM-compatible Inception-v3 by default; any
``varlib.evaluation.FeatureExtractor`` can be plugged in). Metrics go to ``metrics_json``:

* always (with an extractor): Inception Score, its chunks taken in the ``.npz`` row order;
* with real images (``reference_npz``, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``, or a data config
  under ``reference_data``): FID and improved precision/recall as well.

When the Inception weights are absent the run warns, skips the metrics, and still writes the ``.npz``
(score it with the ADM TensorFlow evaluator). Configuration: ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import hydra
import numpy as np
import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from varlib.cli.common import (
    CONFIG_PATH,
    check_sampling_options,
    generate_in_batches,
    instantiate_config,
    load_var_model,
    model_resolution,
    parse_labels,
    resolve_device,
    resolve_precision,
    run_or_exit,
)
from varlib.configs import datamodule_config
from varlib.data.base import check_int_at_least, images_from_batch
from varlib.evaluation import (
    AdmNpzWriter,
    fid_from_features,
    inception_score,
    load_adm_npz,
    precision_recall,
    shuffle_permutation,
    signed_float_to_uint8,
    unit_float_to_uint8,
)

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """The written files and the metrics (empty when skipped; ``skipped`` then says why)."""

    npz_path: Path
    metrics_path: Path
    num_images: int
    metrics: dict[str, float] = field(default_factory=dict)
    num_reference_images: int = 0
    skipped: str | None = None


class FeatureCollector:
    """Runs a feature extractor on uint8 batches (B,3,H,W) and keeps features (N,D) and logits (N,K) on the CPU."""

    def __init__(self, extractor: nn.Module, device: torch.device) -> None:
        self.extractor = extractor.to(device).eval() if isinstance(extractor, nn.Module) else extractor
        self.device = device
        self.features: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, images_uint8_BCHW: torch.Tensor) -> None:
        output = self.extractor(images_uint8_BCHW.to(self.device))
        batch = images_uint8_BCHW.shape[0]
        if (not isinstance(output, (tuple, list)) or len(output) != 2
                or any(t.ndim != 2 or t.shape[0] != batch for t in output)):
            got = [tuple(t.shape) for t in output] if isinstance(output, (tuple, list)) else type(output).__name__
            raise ValueError(f"the feature extractor must return (features (B,D), logits (B,K)) for B={batch}, "
                             f"got {got}")
        self.features.append(output[0].float().cpu())
        self.logits.append(output[1].float().cpu())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N,D), logits (N,K)) of everything added."""
        return torch.cat(self.features), torch.cat(self.logits)


def build_extractor(cfg: DictConfig) -> tuple[nn.Module | None, str | None]:
    """The configured extractor, or (None, reason) when it is disabled or its weights file is missing."""
    if cfg.inception is None:
        return None, "inception=null: metrics disabled"
    try:
        return instantiate_config(cfg.inception), None
    except FileNotFoundError as error:
        logger.warning("%s\nMetrics are skipped; the .npz is still written for the ADM evaluator.", error)
        return None, f"feature extractor weights not found: {error}"


def open_reference(cfg: DictConfig, resolution: int) -> np.ndarray | LightningDataModule | None:
    """The source of real images, opened before generation so that a bad path fails early: the uint8
    (N,H,W,3) array of ``reference_npz``, the ``reference_data`` DataModule (at the model's resolution), or None."""
    if cfg.reference_npz is not None and cfg.get("reference_data") is not None:
        raise ValueError(f"expected at most one source of real images, got reference_npz={cfg.reference_npz!r} "
                         "and reference_data")
    if cfg.reference_npz is not None:
        path = Path(cfg.reference_npz)
        if not path.is_file():
            raise FileNotFoundError(f"reference_npz: expected an ADM reference batch at {path}, got nothing there")
        images_NHWC = load_adm_npz(path)
        if images_NHWC.shape[1:3] != (resolution, resolution):
            logger.warning("reference images are %dx%d, generated ones %dx%d: the extractor resizes both, but FID "
                           "is only comparable at equal resolutions", *images_NHWC.shape[1:3], resolution, resolution)
        return images_NHWC
    if cfg.get("reference_data") is not None:
        datamodule = instantiate_config(datamodule_config(cfg.reference_data), image_size=resolution)
        datamodule.setup("validate")
        return datamodule
    return None


def reference_batches(reference: np.ndarray | LightningDataModule, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 real images (B,3,H,W) from an (N,H,W,3) array or a DataModule's validation loader."""
    if isinstance(reference, np.ndarray):
        for start in tqdm(range(0, len(reference), batch_size), desc="reference features", unit="batch"):
            yield torch.from_numpy(reference[start:start + batch_size]).permute(0, 3, 1, 2)
    else:
        for batch in tqdm(reference.val_dataloader(), desc="reference features", unit="batch"):
            if batch is not None:  # a batch whose samples were all unreadable
                yield signed_float_to_uint8(images_from_batch(batch))


def reference_features(
    cfg: DictConfig, reference: np.ndarray | LightningDataModule, extractor: nn.Module, device: torch.device
) -> torch.Tensor:
    """Features (N,D) of up to ``reference_limit`` real images; at least pr_k + 1 of them."""
    collector = FeatureCollector(extractor, device)
    limit, count = cfg.reference_limit, 0
    for images_BCHW in reference_batches(reference, cfg.extract_batch_size):
        if limit is not None:
            images_BCHW = images_BCHW[: limit - count]
        collector.add(images_BCHW)
        count += images_BCHW.shape[0]
        if limit is not None and count >= limit:
            break
    needed = max(cfg.pr_k + 1, 2)
    if count < needed:
        raise ValueError(f"FID and precision/recall need at least {needed} real images, got {count}")
    return collector.result()[0]


def check_counts(num_fake: int, num_is_splits: int, pr_k: int) -> None:
    """Raises ValueError when too few images would be generated for IS / precision-recall."""
    if num_fake < max(num_is_splits, pr_k + 1, 2):
        raise ValueError(
            f"metrics need at least max(num_is_splits={num_is_splits}, pr_k+1={pr_k + 1}, 2) generated images, "
            f"got num_classes x num_per_class = {num_fake}"
        )


def run(cfg: DictConfig) -> EvaluationResult:
    """Generates, writes the shuffled ``.npz`` and ``metrics_json``, and returns both (see module docstring)."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    num_classes = var.num_classes if cfg.num_classes is None else cfg.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= var.num_classes:
        raise ValueError(f"num_classes must be an int in [1, {var.num_classes}] (the model's classes), "
                         f"got {num_classes!r}")
    labels = parse_labels(None, num_classes, cfg.num_per_class)
    options = check_sampling_options(cfg, var.vocab_size)
    check_int_at_least("extract_batch_size", cfg.extract_batch_size, 1)
    resolution = model_resolution(var)
    reference = open_reference(cfg, resolution)

    extractor, skipped = build_extractor(cfg)
    fakes = None
    if extractor is not None:
        check_counts(len(labels), cfg.num_is_splits, cfg.pr_k)
        fakes = FeatureCollector(extractor, device)
    with AdmNpzWriter(cfg.npz, len(labels), resolution, resolution, seed=cfg.seed) as writer:
        for images_BCHW, _ in generate_in_batches(var, labels, cfg.batch_size, cfg.seed, options, desc="generating",
                                                  precision=cfg.precision):
            images_uint8_BCHW = unit_float_to_uint8(images_BCHW)
            writer.add(images_uint8_BCHW)
            if fakes is not None:
                fakes.add(images_uint8_BCHW)
    logger.info("wrote %d shuffled samples to %s", len(labels), writer.path)

    result = EvaluationResult(writer.path, Path(cfg.metrics_json), len(labels), skipped=skipped)
    if fakes is not None:
        fake_features, fake_logits = fakes.result()
        # The chunks the ADM evaluator takes from the shuffled .npz (class-sorted chunks would deflate IS).
        order = torch.from_numpy(shuffle_permutation(len(labels), cfg.seed))
        result.metrics["is_mean"], result.metrics["is_std"] = inception_score(fake_logits[order], cfg.num_is_splits)
        if reference is not None:
            real_features = reference_features(cfg, reference, fakes.extractor, device)
            result.num_reference_images = real_features.shape[0]
            result.metrics["fid"] = fid_from_features(real_features, fake_features)
            result.metrics["precision"], result.metrics["recall"] = precision_recall(
                real_features, fake_features, cfg.pr_k)
        logger.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    write_metrics_json(cfg, result, num_classes)
    return result


def write_metrics_json(cfg: DictConfig, result: EvaluationResult, num_classes: int) -> None:
    """Writes the metrics together with the settings that produced them to ``result.metrics_path``."""
    if cfg.reference_npz is not None:
        reference = str(cfg.reference_npz)
    else:
        reference = cfg.reference_data._target_ if cfg.get("reference_data") is not None else None
    record: dict[str, Any] = {
        "npz": str(result.npz_path), "num_images": result.num_images, "num_classes": num_classes,
        "num_per_class": cfg.num_per_class, "guidance": cfg.guidance, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "seed": cfg.seed, "batch_size": cfg.batch_size, "more_smooth": cfg.more_smooth,
        "reference": reference, "num_reference_images": result.num_reference_images, "metrics": result.metrics,
    }
    if result.skipped is not None:
        record["metrics_skipped"] = result.skipped
    result.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    result.metrics_path.write_text(json.dumps(record, indent=1))


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
