"""Shared pieces of the image DataModules: config validation, DataLoader construction, the batch format."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from varlib.data.resumable import ClassBalancedSampler, ResumableLoader, ResumableSampler, check_class_balance
from varlib.data.skipping import SkipCounter, collate_skipping_none


@dataclass(frozen=True)
class Unit:
    """One shard's worth of images: ``make_loader()`` yields ``(images (B,[C,]3,R,R), labels (B,)[, captions])``
    (captions: B str) or None (a batch whose images were all unreadable); ``size`` is its image count when known
    (else None);
    ``skip_count()`` reads the split's skip counter, whose growth over the unit is the unit's skipped images."""

    index: int
    make_loader: Callable[[], DataLoader]
    size: int | None
    skip_count: Callable[[], int]


def units_of_range(count: int, shard_size: int, make_loader: Callable[[range], DataLoader],
                   skip_count: Callable[[], int]) -> list[Unit]:
    """Units of ``shard_size`` consecutive indices of a map-style dataset of ``count`` images;
    ``make_loader(indices)`` returns the loader of those indices in order."""
    ranges = [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]
    return [Unit(i, (lambda r=r: make_loader(r)), len(r), skip_count) for i, r in enumerate(ranges)]


def check_int_at_least(name: str, value: Any, minimum: int) -> int:
    """Return `value` if it is an int >= minimum, else raise ValueError naming expected vs got."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_open_fraction(name: str, value: Any) -> float:
    """Return `value` as float if it lies strictly between 0 and 1, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


class ImageDataModule(LightningDataModule):
    """Base class: validated loader settings and one `SkipCounter` per split.

    Subclasses build their datasets in `setup` and hand them to `make_loader`. Batches are
    `(images (B, 3, image_size, image_size) float32 in [-1, 1], labels (B,) int64)`. The training order and
    augmentation of a map-style set depend only on `shuffle_seed`, the epoch and the index, and the train loader's
    position is saved in checkpoints, so a resumed run replays them, mid-epoch too (`varlib.data.resumable`).
    `class_balance` > 0 draws the training rows class-balanced (`ClassBalancedSampler`: 1.0 = every class equally
    often); a map-style training set then needs `labels` (an int64 tensor (N,)).
    """

    def __init__(self, batch_size: int, num_workers: int, image_size: int, hflip: bool, shuffle_seed: int = 0,
                 class_balance: float = 0.0) -> None:
        super().__init__()
        self.class_balance = check_class_balance(class_balance)
        self.shuffle_seed = check_int_at_least("shuffle_seed", shuffle_seed, 0)
        self.batch_size = check_int_at_least("batch_size", batch_size, 1)
        self.num_workers = check_int_at_least("num_workers", num_workers, 0)
        self.image_size = check_int_at_least("image_size", image_size, 1)
        if not isinstance(hflip, bool):
            raise ValueError(f"hflip must be a bool, got {hflip!r}")
        self.hflip = hflip
        self.skip_counters = {"train": SkipCounter(), "val": SkipCounter()}

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this process's train and val loaders (and their workers)."""
        return sum(counter.value for counter in self.skip_counters.values())

    def tokenizing_units(self, split: str, transform: Callable, shard_size: int) -> list[Unit]:
        """The split cut into units of ``shard_size`` images for ``varlib-tokenize``, read in order with
        ``transform`` (the deterministic evaluation crop, or several crops) in place of the split's own."""
        self.setup("fit")
        dataset = getattr(self, f"{split}_set", None)
        if dataset is None or not hasattr(dataset, "transform"):
            raise ValueError(f"expected {type(self).__name__} to hold a map-style {split}_set with a transform "
                             f"after setup, got {type(dataset).__name__}")
        dataset.transform = transform
        counter = self.skip_counters[split]
        return units_of_range(len(dataset), shard_size,
                              lambda indices: self.make_loader(Subset(dataset, indices), train=False),
                              lambda: counter.value)

    def train_dataloader(self) -> DataLoader:
        """The loader of the map-style ``train_set`` that ``setup`` builds (a module reading a stream overrides it)."""
        self.setup("fit")
        return self.make_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """The loader of the ``val_set`` that ``setup`` builds."""
        self.setup("validate")
        return self.make_loader(self.val_set, train=False)

    def make_loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """DataLoader with the shared settings. A map-style training set gets a `ResumableLoader` (seeded shuffle,
        disjoint rank shares, full batches; class-balanced draws with `class_balance`); an iterable one (web
        shards) is read in its own order."""
        settings = dict(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skipping_none,
        )
        if train and not isinstance(dataset, IterableDataset):
            if self.class_balance:
                sampler = ClassBalancedSampler(dataset.labels, self.class_balance, seed=self.shuffle_seed)
            else:
                sampler = ResumableSampler(len(dataset), seed=self.shuffle_seed)
            return ResumableLoader(dataset, self.batch_size, sampler, **settings)
        return DataLoader(dataset, batch_size=self.batch_size, drop_last=train, **settings)


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
