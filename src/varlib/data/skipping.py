"""Skip-and-count machinery for bad samples, shared between the main process and DataLoader workers.

Design: a map-style dataset must return something for every index, so an unreadable file makes
`__getitem__` return None (after counting it and logging a warning that names the file), and
`collate_skipping_none` drops those Nones before collating. A batch containing a bad file
therefore still yields its good samples, one smaller. Only when *every* sample of a batch is bad
does the collate return None; Lightning modules should skip such a batch
(`if batch is None: return None` in `training_step`). Streaming (WebDataset) pipelines filter bad
samples out before batching, so their batches are always full.

The count must be visible in the main process although decoding happens in worker processes:
`SkipCounter` keeps one int64 slot per process in a shared-memory tensor (main process = slot 0,
worker k = slot k + 1). Each process only writes its own slot, so increments never race, and the
total is the sum. Counts are per distributed rank and count events: a bad file read in three
epochs counts three times.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch.utils.data import default_collate, get_worker_info

logger = logging.getLogger(__name__)


class SkipCounter:
    """Number of skipped samples, summed over the main process and all DataLoader workers."""

    # Slot 0 for the main process plus 256 worker slots; ids beyond that share slots modulo 256.
    NUM_SLOTS = 257

    def __init__(self) -> None:
        self._counts = torch.zeros(self.NUM_SLOTS, dtype=torch.int64).share_memory_()

    def record(self, what: str, reason: str) -> None:
        """Count one skipped sample and log a warning naming it and why.

        `what` is a noun phrase such as "image file /data/x.jpg"; `reason` is the error message.
        """
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (self.NUM_SLOTS - 1)
        self._counts[slot] += 1
        logger.warning("Skipping %s: %s", what, reason)

    @property
    def value(self) -> int:
        """Total number of samples skipped so far."""
        return int(self._counts.sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value})"


def collate_skipping_none(samples: Sequence[Any | None]) -> Any | None:
    """Collate a list of samples after dropping the None entries (bad files).

    Input: list of samples, e.g. `(image (3, H, W), label ())` tuples, some possibly None.
    Output: `default_collate` of the remaining samples, e.g. `(images (B', 3, H, W), labels (B',))`
    with B' = number of good samples, or None when no sample is good.
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None
    return default_collate(kept)
