"""Lightning callback that logs FID, IS, precision and recall of generated images during validation.

Contract with the LightningModule (the only thing this callback needs from the model)::

    def generate_images(self, labels_B: torch.LongTensor, seed: int) -> torch.Tensor:
        '''Class-conditional samples for ``labels_B`` (B,), as floats in [0, 1] of shape (B, 3, H, W).
        The same (labels, seed) must give the same images.'''

Real images come from ``trainer.datamodule.val_dataloader()``, whose batches are ``(images, labels, ...)``
tuples/lists, dicts with an ``"image"`` or ``"images"`` key, or bare image tensors; images are floats in
[-1, 1] of shape (B, 3, H, W).

If the feature extractor cannot be built (e.g. the Inception weights are absent), if the module has no
``generate_images`` or the trainer no datamodule, the callback warns once and does nothing more: it never stops
training. With several processes, each one generates and extracts its share of the batches and torchmetrics
gathers the features before ``compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from varlib.evaluation.generative_metrics import GenerativeMetrics


def unit_float_to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (B,3,H,W) -> uint8 in [0, 255] (values outside are clamped)."""
    return (images_BCHW.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def signed_float_to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B,3,H,W) -> uint8 in [0, 255] (values outside are clamped)."""
    return unit_float_to_uint8((images_BCHW.float() + 1.0) / 2.0)


def images_from_batch(batch: object) -> torch.Tensor:
    """The image tensor of a validation batch: ``batch[0]``, ``batch["image"]``/``batch["images"]``, or it."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images"):
            if key in batch:
                return batch[key]
        raise ValueError(f"expected a batch dict with an 'image' or 'images' key, got keys {sorted(batch)}")
    if isinstance(batch, Sequence) and len(batch) > 0 and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"expected a batch (images, labels, ...), a dict or a tensor, got {type(batch).__name__}")


def _check_float_images(images_BCHW: torch.Tensor, what: str) -> None:
    if not images_BCHW.is_floating_point() or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(
            f"{what}: expected float images of shape (B,3,H,W), got {images_BCHW.dtype} {tuple(images_BCHW.shape)}"
        )


class GenerationMetricsCallback(lightning.Callback):
    """Every ``every_n_epochs`` validation epochs, log ``val/fid``, ``val/is``, ``val/precision``, ``val/recall``.

    Args:
        extractor: a ``FeatureExtractor`` module, or a zero-argument factory returning one (called once, at the
            first evaluation, e.g. ``varlib.evaluation.build_inception_extractor``).
        num_classes: labels 0..num_classes-1 are generated.
        num_per_class: images generated per class (the total must be >= ``num_is_splits`` and > ``pr_k``).
        every_n_epochs: evaluate after validation epochs where (epoch + 1) is a multiple of this.
        batch_size: labels per ``generate_images`` call; batch i uses seed ``seed + i``.
        seed: base seed of generation.
        max_real_images: real images taken from the validation loader (default: as many as generated).
        num_is_splits, pr_k: passed to ``GenerativeMetrics``.
    """

    def __init__(
        self,
        extractor: nn.Module | Callable[[], nn.Module],
        num_classes: int,
        num_per_class: int = 10,
        every_n_epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        max_real_images: int | None = None,
        num_is_splits: int = 10,
        pr_k: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_per_class", num_per_class),
                            ("every_n_epochs", every_n_epochs), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        num_generated = num_classes * num_per_class
        if num_generated < max(num_is_splits, pr_k + 1, 2):
            raise ValueError(
                f"num_classes * num_per_class = {num_generated} images are too few: need at least "
                f"max(num_is_splits={num_is_splits}, pr_k + 1={pr_k + 1}, 2)"
            )
        self.extractor = extractor
        self.num_classes = num_classes
        self.num_per_class = num_per_class
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.max_real_images = num_generated if max_real_images is None else max_real_images
        self.num_is_splits = num_is_splits
        self.pr_k = pr_k
        self.metric: GenerativeMetrics | None = None
        self.disabled_reason: str | None = None

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"GenerationMetricsCallback is disabled: {reason}")

    def _build_metric(self) -> GenerativeMetrics | None:
        if self.metric is None and self.disabled_reason is None:
            try:
                extractor = self.extractor if isinstance(self.extractor, nn.Module) else self.extractor()
                self.metric = GenerativeMetrics(extractor, num_is_splits=self.num_is_splits, pr_k=self.pr_k)
            except Exception as error:  # any failure to build must not stop training
                self._disable(f"the feature extractor could not be built ({type(error).__name__}: {error})")
        return self.metric

    def on_validation_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if self.disabled_reason is None and not callable(getattr(pl_module, "generate_images", None)):
            self._disable(f"{type(pl_module).__name__} has no generate_images(labels_B, seed) method")
        if self.disabled_reason is None and getattr(trainer, "datamodule", None) is None:
            self._disable("the trainer has no datamodule to take real validation images from")
        metric = self._build_metric()
        if metric is None:
            return
        metric.to(pl_module.device)
        metric.reset()
        try:
            self._add_real_images(trainer, metric, pl_module.device)
            self._add_generated_images(trainer, pl_module, metric)
            results = metric.compute()
        except ValueError as error:
            rank_zero_warn(f"GenerationMetricsCallback skipped epoch {trainer.current_epoch}: {error}")
            return
        finally:
            metric.reset()
        pl_module.log("val/fid", results["fid"])
        pl_module.log("val/is", results["is_mean"])
        pl_module.log("val/precision", results["precision"])
        pl_module.log("val/recall", results["recall"])

    def _add_real_images(self, trainer: lightning.Trainer, metric: GenerativeMetrics, device: torch.device) -> None:
        num_taken = 0
        for batch_index, batch in enumerate(trainer.datamodule.val_dataloader()):
            if num_taken >= self.max_real_images:
                break
            images_BCHW = images_from_batch(batch)[: self.max_real_images - num_taken]
            num_taken += images_BCHW.shape[0]
            if batch_index % trainer.world_size != trainer.global_rank:
                continue
            _check_float_images(images_BCHW, "validation batch")
            metric.update(signed_float_to_uint8(images_BCHW.to(device)), real=True)

    @torch.no_grad()
    def _add_generated_images(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, metric: GenerativeMetrics
    ) -> None:
        labels_N = torch.arange(self.num_classes).repeat_interleave(self.num_per_class)
        label_batches = labels_N.split(self.batch_size)
        progress = tqdm(
            label_batches, desc="generating for FID/IS", leave=False, disable=not trainer.is_global_zero
        )
        for batch_index, labels_B in enumerate(progress):
            if batch_index % trainer.world_size != trainer.global_rank:
                continue
            images_BCHW = pl_module.generate_images(labels_B.to(pl_module.device), seed=self.seed + batch_index)
            _check_float_images(images_BCHW, "generate_images output")
            if images_BCHW.shape[0] != labels_B.shape[0]:
                raise ValueError(
                    f"generate_images returned {images_BCHW.shape[0]} images for {labels_B.shape[0]} labels"
                )
            metric.update(unit_float_to_uint8(images_BCHW), real=False)
