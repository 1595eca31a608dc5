"""Training order that a resumed run replays exactly, mid-epoch too: seeded samplers and a resumable DataLoader.

Lightning 2.6 resumes a run killed mid-epoch with a fresh iterator over the train loader. It only asks the loader
itself where it was: a loader with ``state_dict``/``load_state_dict`` has its state saved in the checkpoint (loop
state ``combined_loader``) and loaded before the first batch; any other loader starts the epoch again at batch 0
(Lightning warns, then ends the epoch after the remaining number of batches, so it trains on the wrong ones).
:class:`ResumableLoader` is such a loader. Its state is the epoch and the batches it has handed out; loading it
makes its :class:`ResumableSampler` start the next pass right after them.

The order of each epoch depends only on (seed, epoch, rank, world size), whether shuffled
(:class:`ResumableSampler`) or drawn class-balanced (:class:`ClassBalancedSampler`), and each index carries the seed of
its sample's random augmentation, drawn from (seed, epoch, index) (:class:`SeededIndex`), so crops and flips
replay too, in whichever DataLoader worker reads the sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SeededIndex(int):
    """A dataset index that carries the seed of its sample's random augmentation; an ``int`` everywhere else."""

    seed: int

    def __new__(cls, index: int, seed: int) -> SeededIndex:
        value = super().__new__(cls, index)
        value.seed = seed
        return value

    def __reduce__(self) -> tuple:  # DataLoader workers receive indices pickled
        return SeededIndex, (int(self), self.seed)


def sample_generator(index: int) -> torch.Generator | None:
    """The generator a dataset draws the augmentation of item ``index`` from: seeded by a :class:`SeededIndex`,
    None for a plain index (then torch's global RNG)."""
    seed = getattr(index, "seed", None)
    return None if seed is None else torch.Generator().manual_seed(seed)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for the augmentation of row ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def world_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``num_replicas`` and ``rank``, each defaulting to torch.distributed's (1 and 0 when it is not running)."""
    running = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if running else 1
    if rank is None:
        rank = torch.distributed.get_rank() if running else 0
    return num_replicas, rank


class ResumableSampler(DistributedSampler):
    """Each epoch: all rows shuffled with ``seed + epoch`` and dealt to the ranks in turn (DistributedSampler's
    order), the tail that does not divide dropped so that every rank yields ``num_rows // num_replicas`` rows.

    Yields :class:`SeededIndex` rows. :meth:`resume` makes the next pass over ``epoch`` skip the rows a killed run
    had already trained on. Being a DistributedSampler, Lightning uses it as is under DDP/FSDP. Subclasses
    change the order by overriding :meth:`epoch_rows`.
    """

    def __init__(self, num_rows: int, num_replicas: int | None = None, rank: int | None = None, seed: int = 0):
        num_replicas, rank = world_and_rank(num_replicas, rank)
        if num_rows < num_replicas:
            raise ValueError(f"expected at least one row per rank, got {num_rows} rows for {num_replicas} ranks")
        super().__init__(range(num_rows), num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.num_rows = num_rows
        self.resume_at: tuple[int, int] | None = None  # (epoch, rows of it to skip) for the next pass

    def epoch_rows(self) -> list[int]:
        """This rank's rows of the current epoch, in order."""
        return list(super().__iter__())

    def resume(self, epoch: int, rows_done: int) -> None:
        """Sets the epoch; its next pass starts after its first ``rows_done`` rows (a mid-epoch resume)."""
        if not 0 <= rows_done <= self.num_samples:
            raise ValueError(f"cannot resume after {rows_done} rows of an epoch of {self.num_samples} rows per rank")
        self.set_epoch(epoch)
        self.resume_at = (epoch, rows_done)

    def rows_to_skip(self) -> int:
        """Rows the next pass skips: those of a pending :meth:`resume` of the current epoch, else 0."""
        return self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == self.epoch else 0

    def __iter__(self) -> Iterator[SeededIndex]:
        skip, self.resume_at, epoch = self.rows_to_skip(), None, self.epoch
        return (SeededIndex(row, augmentation_seed(self.seed, epoch, row)) for row in self.epoch_rows()[skip:])


class ResumableLoader(DataLoader):
    """Training DataLoader over a :class:`ResumableSampler` (full batches only) whose position Lightning keeps in
    its checkpoints, so that a resumed run continues with the batch after the last one trained.

    ``state_dict()`` is ``{"epoch", "batches"}``: the epoch of the current pass and the batches handed out in it.
    Exact as long as Lightning does not fetch ahead, which it does not for a loader with a length.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.position = {"epoch": sampler.epoch, "batches": 0}

    def __iter__(self) -> Iterator[Any]:
        self.position = {"epoch": self.sampler.epoch, "batches": self.sampler.rows_to_skip() // self.batch_size}
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"epoch", "batches"}:
            raise ValueError(f"expected a train loader state with keys epoch and batches, got {sorted(state)}")
        self.sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)
        self.position = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def check_class_balance(balance: object) -> float:
    """``balance`` as a float when it lies in [0, 1], else a ValueError naming the range and the value."""
    if isinstance(balance, bool) or not isinstance(balance, (int, float)) or not 0.0 <= balance <= 1.0:
        raise ValueError(f"class_balance must be a number in [0, 1], got {balance!r} (0: the data's class mix, "
                         f"1: every class equally often)")
    return float(balance)


class ClassBalancedSampler(ResumableSampler):
    """Each epoch: as many rows as the data holds, drawn with replacement, row i with weight
    ``count[label_i] ** -balance`` (0: the data's class frequencies, 1: every class equally often), seeded with
    ``seed + epoch`` and dealt to the ranks in turn.

    For small, skewed data (the emoji set is 60% one class); rows are read in random order, not in blocks.
    """

    def __init__(self, labels_N: torch.Tensor, balance: float, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        balance = check_class_balance(balance)
        super().__init__(len(labels_N), num_replicas, rank, seed)
        self.weights_N = torch.bincount(labels_N)[labels_N].double().pow(-balance)

    def epoch_rows(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rows = torch.multinomial(self.weights_N, self.num_samples * self.num_replicas, True, generator=generator)
        return rows[self.rank::self.num_replicas].tolist()
