"""A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from a private generator seeded with seed + epoch.

    Lightning calls ``set_epoch`` at every epoch start (and replaces it by a ``DistributedSampler``, which
    follows the same rule, under DDP). Unlike a plain shuffled DataLoader, the order does not depend on
    the global RNG, so restarting from a checkpoint replays the same epochs.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ClassBalancedEpochSampler(EpochShuffleSampler):
    """Draws ``len(labels)`` indices per epoch with replacement, an item of class c with probability
    proportional to ``count(c) ** -class_balance``: 0 keeps the data's class mix, 1 makes every class equally
    likely (for imbalanced data scored per class). Like ``EpochShuffleSampler``, the draw depends only on
    (seed, epoch).
    """

    def __init__(self, labels_N: torch.Tensor, class_balance: float, seed: int = 0):
        if not 0.0 <= class_balance <= 1.0:
            raise ValueError(f"class_balance must be in [0, 1], got {class_balance!r}")
        super().__init__(labels_N.shape[0], seed)
        counts = torch.bincount(labels_N).double()
        self.weights_N = counts[labels_N] ** -class_balance

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.multinomial(self.weights_N, self.num_samples, replacement=True, generator=generator).tolist())
