"""Lightning callback that logs FID, IS, precision and recall of generated images during validation.

Contract with the LightningModule (the only thing this callback needs from the model)::

    def image_generator(self) -> ContextManager[Callable[[torch.LongTensor, int], torch.Tensor]]:
        '''Entered on every rank at once (a sharded model gathers its weights here); gives
        ``generate(labels_B, seed)`` -> class-conditional samples (B, 3, H, W), floats in [0, 1].
        The same (labels, seed) must give the same images.'''

The real side is a reference file (``varlib.evaluation.reference``: feature mean/covariance over a real image
set and, optionally, a sample of those images for precision/recall), made once with ``varlib-reference``, so
training on any data (token cache, shards, folders) is scored against the same statistics.

The images are cut into fixed batches (batch i: labels ``i*batch_size...``, seed ``seed + i``); rank r makes
batches i with i % world_size == r, and the features are gathered back in batch order, so every rank computes
the same values, and they equal those of one process. If the feature extractor or the reference cannot be
loaded (e.g. the Inception weights are absent), or the module has no ``image_generator`` or trains a text-conditional
model, the callback warns once and does nothing more: it never stops training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from varlib.evaluation.generative_metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from varlib.evaluation.reference import ReferenceStatistics, load_reference
from varlib.images import unit_float_to_uint8
from varlib.loggers import log_image


def gather_in_batch_order(trainer: lightning.Trainer, local: dict[int, torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """Rows (n_i, K) of every batch i, made by rank i % world_size, concatenated in batch order on every rank.

    Ranks may hold different numbers of batches (or none): the batches are padded to one shape to gather.
    Collective: call it on every rank. Returns a CPU tensor (sum n_i, K).
    """
    world = trainer.world_size
    if world == 1:
        return torch.cat([local[i].cpu() for i in range(len(sizes))])
    device = trainer.strategy.root_device
    width = max((t.shape[1] for t in local.values()), default=0)
    width = int(trainer.strategy.all_gather(torch.tensor(width, device=device)).max())
    buffer = torch.zeros(math.ceil(len(sizes) / world), max(sizes), width, device=device)
    for index, rows in local.items():
        buffer[index // world, : rows.shape[0]] = rows.float()
    gathered = trainer.strategy.all_gather(buffer).cpu()  # (world, batches per rank, max size, K)
    return torch.cat([gathered[i % world, i // world, :size] for i, size in enumerate(sizes)])


class GenerationMetricsCallback(lightning.Callback):
    """Every ``every_n_epochs`` validation epochs, log ``val/fid``, ``val/is``, ``val/precision``, ``val/recall``
    (the last two when the reference holds images) and a grid of the first generated batch (to every logger).

    Args:
        extractor: a ``FeatureExtractor`` module (uint8 (B,3,H,W) -> (features (B,D), logits (B,K))), or a
            zero-argument factory returning one (called once, at the first evaluation, e.g.
            ``varlib.evaluation.build_inception_extractor``).
        reference: the reference statistics ``.npz`` (``varlib.evaluation.reference``, ADM reference batch).
        num_classes: labels 0..num_classes-1 are generated.
        num_per_class: images generated per class (the total must be >= ``num_is_splits`` and > ``pr_k``).
        every_n_epochs: evaluate after validation epochs where (epoch + 1) is a multiple of this.
        batch_size: labels per ``generate`` call; batch i uses seed ``seed + i``.
        seed: base seed of generation.
        num_is_splits, pr_k: Inception Score chunks and precision/recall neighbourhood (ADM: 10, 3).
        is_shuffle_seed: generated logits are permuted with this seed before the IS split (class-sorted order
            would deflate IS).
        grid_images: how many images of the first batch the logged grid shows (0: no grid).
    """

    def __init__(
        self,
        extractor: nn.Module | Callable[[], nn.Module],
        reference: str,
        num_classes: int,
        num_per_class: int = 10,
        every_n_epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        num_is_splits: int = 10,
        pr_k: int = 3,
        is_shuffle_seed: int = 0,
        grid_images: int = 16,
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
        self.reference = reference
        self.num_classes = num_classes
        self.num_per_class = num_per_class
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.num_is_splits = num_is_splits
        self.pr_k = pr_k
        self.is_shuffle_seed = is_shuffle_seed
        self.grid_images = grid_images
        self.statistics: ReferenceStatistics | None = None
        self.reference_features: torch.Tensor | None = None
        self.disabled_reason: str | None = None

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"GenerationMetricsCallback is disabled: {reason}")

    def _prepare(self, pl_module: lightning.LightningModule) -> bool:
        """Builds the extractor and loads the reference once; False (after one warning) when that fails."""
        if self.disabled_reason is None and not callable(getattr(pl_module, "image_generator", None)):
            self._disable(f"{type(pl_module).__name__} has no image_generator() method")
        if self.disabled_reason is None and getattr(pl_module, "text_conditional", False):
            self._disable(f"{type(pl_module).__name__} trains a text-conditional model; this callback samples "
                          f"classes 0..{self.num_classes - 1}")
        if self.statistics is None and self.disabled_reason is None:
            try:
                if not isinstance(self.extractor, nn.Module):
                    self.extractor = self.extractor()
                self.statistics = load_reference(self.reference)
            except Exception as error:  # any failure to build must not stop training
                self._disable(f"the feature extractor or the reference could not be loaded "
                              f"({type(error).__name__}: {error})")
        if self.disabled_reason is not None:
            return False
        self.extractor.to(pl_module.device).eval()
        return True

    @torch.no_grad()
    def _features(self, images_uint8_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.extractor(images_uint8_BCHW)
        batch = images_uint8_BCHW.shape[0]
        if (not isinstance(output, (tuple, list)) or len(output) != 2
                or any(t.ndim != 2 or t.shape[0] != batch for t in output)):
            raise ValueError(f"the extractor must return (features (B,D), logits (B,K)) for B={batch}")
        return output[0].float(), output[1].float()

    def on_validation_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not self._prepare(pl_module):
            return
        try:
            results = self.evaluate(trainer, pl_module)
        except ValueError as error:
            rank_zero_warn(f"GenerationMetricsCallback skipped epoch {trainer.current_epoch}: {error}")
            return
        for name, value in results.items():  # identical on every rank: no reduction needed
            pl_module.log(f"val/{name}", value)

    def evaluate(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, float]:
        """Generates this rank's batches, gathers all features in batch order and scores them (collective)."""
        rank, world = trainer.global_rank, trainer.world_size
        if self.statistics.images_NHWC is not None and self.reference_features is None:
            reference_batches = torch.from_numpy(self.statistics.images_NHWC).permute(0, 3, 1, 2).split(self.batch_size)
            local = {i: self._features(b.to(pl_module.device))[0]
                     for i, b in enumerate(reference_batches) if i % world == rank}
            self.reference_features = gather_in_batch_order(trainer, local, [b.shape[0] for b in reference_batches])
        labels_N = torch.arange(self.num_classes).repeat_interleave(self.num_per_class)
        label_batches = labels_N.split(self.batch_size)
        features, logits = {}, {}
        with pl_module.image_generator() as generate:
            mine = [i for i in range(len(label_batches)) if i % world == rank]
            for index in tqdm(mine, desc="generating for FID/IS", leave=False, disable=rank != 0):
                images_BCHW = generate(label_batches[index].to(pl_module.device), self.seed + index)
                if (not images_BCHW.is_floating_point() or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3
                        or images_BCHW.shape[0] != label_batches[index].shape[0]):
                    raise ValueError(f"generate must return float images ({label_batches[index].shape[0]},3,H,W), "
                                     f"got {images_BCHW.dtype} {tuple(images_BCHW.shape)}")
                features[index], logits[index] = self._features(unit_float_to_uint8(images_BCHW))
                if index == 0 and self.grid_images > 0:
                    self._log_grid(trainer, images_BCHW[: self.grid_images])
        sizes = [b.shape[0] for b in label_batches]
        fake_ND, fake_logits_NK = gather_in_batch_order(trainer, features, sizes), gather_in_batch_order(trainer, logits, sizes)
        if fake_ND.shape[1] != self.statistics.mu.shape[0]:
            raise ValueError(f"the extractor gives {fake_ND.shape[1]}-d features but the reference {self.reference} "
                             f"holds {self.statistics.mu.shape[0]}-d statistics")
        results = self.scores(fake_ND, fake_logits_NK, pl_module.device) if rank == 0 else None
        # every rank holds the same features: rank 0 alone scores them (float64 FID on the host, precision/recall's
        # N x N distances on the device) and the others receive its values
        return results if world == 1 else trainer.strategy.broadcast(results, src=0)

    def scores(self, fake_ND: torch.Tensor, fake_logits_NK: torch.Tensor, device: torch.device) -> dict[str, float]:
        """FID, IS and (with reference images) precision/recall of the gathered features of the generated images."""
        permutation = torch.randperm(fake_logits_NK.shape[0], generator=torch.Generator().manual_seed(self.is_shuffle_seed))
        results = {
            "fid": frechet_distance(self.statistics.mu, self.statistics.sigma, *feature_statistics(fake_ND)),
            "is": inception_score(fake_logits_NK[permutation], self.num_is_splits)[0],
        }
        if self.reference_features is not None:
            results["precision"], results["recall"] = precision_recall(
                self.reference_features.to(device), fake_ND.to(device), self.pr_k)
        return results

    def _log_grid(self, trainer: lightning.Trainer, images_BCHW: torch.Tensor) -> None:
        from varlib.images import image_grid  # varlib.images imports this package

        grid = image_grid(images_BCHW.float().clamp(0, 1).cpu(), columns=math.ceil(math.sqrt(images_BCHW.shape[0])))
        log_image(trainer, "val/generated", grid, trainer.global_step)
