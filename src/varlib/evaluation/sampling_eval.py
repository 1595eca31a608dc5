"""The evaluation set of ``varlib-evaluate`` (the paper's protocol), generated and scored on one or several processes.

Steps: draw ``num_per_class`` images of each class 0..num_classes-1 in batches of ``batch_size`` (batch i with
seed + i), pass their uint8 pixels through the feature extractor (``inception._target_``, the ADM-compatible
Inception-v3 by default; any ``varlib.evaluation.FeatureExtractor`` can be plugged in), and write each batch with
its features as one shard file in ``shard_dir`` (atomically: a temporary name, then a rename). Then the shards are
merged, in batch order, into a shuffled ADM ``.npz`` (``AdmNpzWriter``) and the metrics go to ``metrics_json``:

* always (with an extractor): Inception Score, its chunks taken in the ``.npz`` row order;
* with real images (``reference_npz``, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``, or a data config
  under ``reference_data``): FID and improved precision/recall as well.

Under ``torchrun`` (RANK and WORLD_SIZE set) process r of W samples the batches r, r + W, ...: the batches and
their seeds do not depend on W, so any number of processes writes the same shards, ``.npz`` and metrics. A gloo
process group only provides the barrier after which rank 0 merges (``shard_dir`` must be on a file system every
rank sees). A killed run, started again with the same settings, keeps the shards it finished and samples the
rest; shards written with other settings stop the run with the differences listed. After a successful merge the
shards are deleted.

When the Inception weights are absent the run warns, skips the metrics, and still writes the ``.npz``
(score it with the ADM TensorFlow evaluator). Configuration: ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from varlib.configs import datamodule_config, instantiate_config
from varlib.data.base import check_int_at_least, images_from_batch
from varlib.data.tokenizing import distributed_rank
from varlib.evaluation.adm_npz import AdmNpzWriter, load_adm_npz, shuffle_permutation
from varlib.evaluation.generative_metrics import fid_from_features, inception_score, precision_recall
from varlib.generation import generate_in_batches, load_var_model, parse_labels, sampling_options
from varlib.images import signed_float_to_uint8, unit_float_to_uint8
from varlib.inference import model_resolution, rank_device, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

SHARD_FORMAT = "varlib-evaluation-shard-1"
# The barrier before the merge waits for the slowest rank's share (an hour or more at the paper's 50,000 images).
BARRIER_TIMEOUT = timedelta(hours=12)


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
    def extract(self, images_uint8_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B,D), logits (B,K)) float32 on the CPU of uint8 images (B,3,H,W)."""
        output = self.extractor(images_uint8_BCHW.to(self.device))
        batch = images_uint8_BCHW.shape[0]
        if (not isinstance(output, (tuple, list)) or len(output) != 2
                or any(t.ndim != 2 or t.shape[0] != batch for t in output)):
            got = [tuple(t.shape) for t in output] if isinstance(output, (tuple, list)) else type(output).__name__
            raise ValueError(f"the feature extractor must return (features (B,D), logits (B,K)) for B={batch}, "
                             f"got {got}")
        return output[0].float().cpu(), output[1].float().cpu()

    def add(self, images_uint8_BCHW: torch.Tensor) -> None:
        features_BD, logits_BK = self.extract(images_uint8_BCHW)
        self.features.append(features_BD)
        self.logits.append(logits_BK)

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


def shard_path(shard_dir: Path, batch: int) -> Path:
    return shard_dir / f"batch-{batch:06d}.safetensors"


def run_signature(cfg: DictConfig, num_classes: int, options: dict[str, Any], precision: str, resolution: int,
                  with_features: bool) -> dict[str, Any]:
    """What a shard's contents depend on; a resumed run must match it exactly."""
    model = cfg.checkpoint if cfg.get("checkpoint") is not None else OmegaConf.to_container(cfg.official)
    inception = None if cfg.inception is None else OmegaConf.to_container(cfg.inception, resolve=True)
    return {"format": SHARD_FORMAT, "model": model, "num_classes": num_classes, "num_per_class": cfg.num_per_class,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "sampling": options, "precision": precision,
            "resolution": resolution, "inception": inception if with_features else None}


def check_shard(path: Path, signature: dict[str, Any]) -> None:
    """Raises ValueError when the shard at ``path`` was written with settings other than ``signature``'s."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            found = json.loads((shard.metadata() or {}).get("varlib", "{}"))
    except Exception as error:  # a damaged shard: say which file and how to go on
        raise ValueError(f"{path}: expected an evaluation shard, got an unreadable file ({type(error).__name__}: "
                         f"{error}); delete it to sample its batch again") from error
    if found != signature:
        changed = ", ".join(f"{key}: {found.get(key)!r} -> {signature.get(key)!r}"
                            for key in sorted(set(found) | set(signature)) if found.get(key) != signature.get(key))
        raise ValueError(f"{path} was written by an evaluation with other settings ({changed}): use another "
                         "out_dir (or shard_dir), or delete its shards to start again")


def write_shard(path: Path, tensors: dict[str, torch.Tensor], signature: dict[str, Any]) -> None:
    """Writes one batch's shard under a temporary name, then renames it: a killed run leaves no partial shard."""
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"varlib": json.dumps(signature, sort_keys=True)})
    os.replace(partial, path)


@contextmanager
def process_group(world_size: int) -> Iterator[None]:
    """A gloo process group (for the barrier only) when several processes run and none exists yet."""
    if world_size == 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sample_shards(var, labels: list[int], cfg: DictConfig, options: dict[str, Any], precision: str,
                  extractor: FeatureCollector | None, shard_dir: Path, signature: dict[str, Any], rank: int,
                  world_size: int) -> None:
    """Samples the batches of this rank (rank, rank + world_size, ...) that have no finished shard yet."""
    num_batches = -(-len(labels) // cfg.batch_size)
    mine = range(rank, num_batches, world_size)
    todo = []
    for batch in mine:
        path = shard_path(shard_dir, batch)
        if path.is_file():
            check_shard(path, signature)
        else:
            todo.append(batch)
    if len(todo) < len(mine):
        logger.info("rank %d: %d of its %d batches were already sampled", rank, len(mine) - len(todo), len(mine))
    generated = generate_in_batches(var, labels, cfg.batch_size, cfg.seed, options, precision=precision,
                                    desc=f"generating [{rank}/{world_size}]", batches=todo)
    for batch, (images_BCHW, chunk) in zip(todo, generated):
        images_uint8_BCHW = unit_float_to_uint8(images_BCHW)
        tensors = {"images": images_uint8_BCHW.permute(0, 2, 3, 1), "labels": torch.tensor(chunk)}
        if extractor is not None:
            tensors["features"], tensors["logits"] = extractor.extract(images_uint8_BCHW)
        write_shard(shard_path(shard_dir, batch), tensors, signature)


def merge_shards(cfg: DictConfig, labels: list[int], resolution: int, shard_dir: Path, signature: dict[str, Any],
                 collector: FeatureCollector | None) -> Path:
    """Writes every shard's images, in batch order, to the shuffled ``.npz``; their features go to ``collector``."""
    num_batches = -(-len(labels) // cfg.batch_size)
    with AdmNpzWriter(cfg.npz, len(labels), resolution, resolution, seed=cfg.seed) as writer:
        for batch in tqdm(range(num_batches), desc="merging shards", unit="batch"):
            path = shard_path(shard_dir, batch)
            if not path.is_file():
                raise FileNotFoundError(f"expected the shard of batch {batch} at {path} after every rank finished, "
                                        "got nothing there: is shard_dir on a file system all ranks share?")
            check_shard(path, signature)
            shard = load_file(path)
            expected = labels[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
            if shard["labels"].tolist() != expected:
                raise ValueError(f"{path}: expected the labels {expected}, got {shard['labels'].tolist()}")
            writer.add(shard["images"].numpy())
            if collector is not None:
                collector.features.append(shard["features"])
                collector.logits.append(shard["logits"])
    return writer.path


def remove_shards(shard_dir: Path, num_batches: int) -> None:
    """Deletes the run's shards (and partial files a killed run left), then ``shard_dir`` if it is empty."""
    for batch in range(num_batches):
        path = shard_path(shard_dir, batch)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
    if not any(shard_dir.iterdir()):
        shard_dir.rmdir()


def evaluate_samples(cfg: DictConfig) -> EvaluationResult | None:
    """``varlib-evaluate``: samples this process's share of the shards of an ``evaluate`` config; rank 0 then writes
    the shuffled ``.npz`` and ``metrics_json`` and returns both, the other ranks return None (see module
    docstring)."""
    rank, world_size = distributed_rank()
    device = rank_device(resolve_device(cfg.device), rank, world_size)
    precision = resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    var = load_var_model(cfg, device)
    num_classes = var.num_classes if cfg.num_classes is None else cfg.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= var.num_classes:
        raise ValueError(f"num_classes must be an int in [1, {var.num_classes}] (the model's classes), "
                         f"got {num_classes!r}")
    labels = parse_labels(None, num_classes, cfg.num_per_class)
    options = sampling_options(cfg, var)
    check_int_at_least("batch_size", cfg.batch_size, 1)
    check_int_at_least("extract_batch_size", cfg.extract_batch_size, 1)
    resolution = model_resolution(var)
    reference = open_reference(cfg, resolution) if rank == 0 else None

    extractor, skipped = build_extractor(cfg)
    collector = None
    if extractor is not None:
        check_counts(len(labels), cfg.num_is_splits, cfg.pr_k)
        collector = FeatureCollector(extractor, device)
    shard_dir = Path(cfg.shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    signature = run_signature(cfg, num_classes, options, precision, resolution, collector is not None)
    with process_group(world_size):
        sample_shards(var, labels, cfg, options, precision, collector, shard_dir, signature, rank, world_size)
        if world_size > 1:
            dist.barrier()
    if rank != 0:
        return None
    npz_path = merge_shards(cfg, labels, resolution, shard_dir, signature, collector)
    logger.info("wrote %d shuffled samples to %s", len(labels), npz_path)

    result = EvaluationResult(npz_path, Path(cfg.metrics_json), len(labels), skipped=skipped)
    if collector is not None:
        fake_features, fake_logits = collector.result()
        # The chunks the ADM evaluator takes from the shuffled .npz (class-sorted chunks would deflate IS).
        order = torch.from_numpy(shuffle_permutation(len(labels), cfg.seed))
        result.metrics["is_mean"], result.metrics["is_std"] = inception_score(fake_logits[order], cfg.num_is_splits)
        if reference is not None:
            real_features = reference_features(cfg, reference, collector.extractor, device)
            result.num_reference_images = real_features.shape[0]
            result.metrics["fid"] = fid_from_features(real_features, fake_features)
            result.metrics["precision"], result.metrics["recall"] = precision_recall(
                real_features, fake_features, cfg.pr_k)
        logger.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    write_metrics_json(cfg, result, num_classes, world_size, options)
    remove_shards(shard_dir, -(-len(labels) // cfg.batch_size))
    return result


def write_metrics_json(cfg: DictConfig, result: EvaluationResult, num_classes: int, processes: int,
                       options: dict[str, Any]) -> None:
    """Writes the metrics together with the settings that produced them (``options``: the sampling settings
    used, see :func:`sampling_options`) to ``result.metrics_path``."""
    if cfg.reference_npz is not None:
        reference = str(cfg.reference_npz)
    else:
        reference = cfg.reference_data._target_ if cfg.get("reference_data") is not None else None
    record: dict[str, Any] = {
        "npz": str(result.npz_path), "num_images": result.num_images, "num_classes": num_classes,
        "num_per_class": cfg.num_per_class, **options, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "reference": reference, "num_reference_images": result.num_reference_images, "processes": processes,
        "metrics": result.metrics,
    }
    if result.skipped is not None:
        record["metrics_skipped"] = result.skipped
    result.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    result.metrics_path.write_text(json.dumps(record, indent=1))

