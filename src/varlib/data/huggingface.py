"""Hugging Face ``datasets`` as a varlib DataModule (``data=hf``, ``pip install "varlib[hf]"``): a Hub dataset
(``ILSVRC/imagenet-1k``, an OpenImages or captioned set) or a local builder with files (``parquet``, ``arrow``,
``imagefolder``, ``webdataset``), streamed or read from the Arrow cache.

Rows are read with their image undecoded (``Image(decode=False)``) and decoded by varlib (:func:`decode_rgb_image`),
so a row whose image cannot be decoded, or that lacks its label or caption, is skipped and counted
(:class:`~varlib.data.skipping.SkipCounter`) like a bad file of the other DataModules. A ``ClassLabel`` label column
gives the class names. Train and validation are two named splits, or, for a dataset with one split, its rows
divided by a hash of their image bytes (independent of order, sharding and streaming).

Training order, resumed at the exact sample:

- ``streaming=false``: the split is a map-style set (memory-mapped Arrow) read through varlib's
  :class:`~varlib.data.resumable.ResumableLoader`, as the image folders are.
- ``streaming=true``: the stream is shuffled by ``datasets`` (shard order and a buffer filled from one shard at a
  time, seeded with ``shuffle_seed + epoch``) and divided among ranks (``split_dataset_by_node``) and then
  DataLoader workers (by ``datasets``, shard by shard). Each worker batches its own rows; :class:`StreamLoader`
  hands the workers' batches out in a fixed turn and keeps every rank's and worker's count of rows read in the
  checkpoint. A resumed run reads each worker's stream again up to that count without decoding it, and continues
  with the batch an uninterrupted run would have trained on next. ``datasets``' own ``state_dict`` is not used: it
  drops the shuffle buffer.
"""

from __future__ import annotations

import hashlib
import itertools
from inspect import signature
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from varlib.data.base import ImageDataModule, Unit, check_int_at_least, check_open_fraction
from varlib.data.decoding import ImageDecodeError, decode_rgb_image
from varlib.data.emoji import is_validation_name
from varlib.data.folder import FLAT_CLASS_NAME
from varlib.data.resumable import augmentation_seed, sample_generator, world_and_rank
from varlib.data.shards import BadSampleError
from varlib.data.skipping import SkipCounter, collate_skipping_none
from varlib.data.transforms import ImageTransform

logger = logging.getLogger(__name__)


def import_datasets() -> Any:
    """The ``datasets`` module, or an ImportError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ImportError('data=hf needs the Hugging Face datasets library: pip install "varlib[hf]"') from None
    return datasets


def load_splits(path: str, name: str | None, data_files: Any, data_dir: str | None, streaming: bool,
                cache_dir: str | None) -> Mapping[str, Any]:
    """``datasets.load_dataset(path, name, ...)``: every split, by name. A Hub that cannot be reached becomes one
    ValueError saying what to do."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(path, name, data_files=data_files, data_dir=data_dir, streaming=streaming,
                                     cache_dir=cache_dir)
    except ConnectionError as error:
        raise ValueError(
            f"cannot reach the Hugging Face Hub for {path!r} ({error}): download it once where the Hub can be reached "
            f"(hf download {path} --repo-type dataset) and run with HF_HUB_OFFLINE=1, or point data.path at a local "
            f"builder (data.path=parquet data.data_files='/data/train-*.parquet')") from None


def image_source(image: Any) -> Any:
    """The bytes (else the path) of an undecoded ``Image`` value ``{"bytes", "path"}``; any other value as it is."""
    return (image.get("bytes") or image.get("path")) if isinstance(image, dict) else image


def split_key(image: Any) -> str:
    """A row's name for the hash split: the digest of its image bytes (else of its path)."""
    source = image_source(image)
    data = source.encode() if isinstance(source, str) else bytes(source or b"")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class HashSplit:
    """Callable: a raw row -> whether it belongs to its split, the validation split being the rows whose
    :func:`split_key` hashes (with ``seed``) below ``val_fraction`` (:func:`~varlib.data.emoji.is_validation_name`)."""

    def __init__(self, image_column: str, val_fraction: float, seed: int, validation: bool) -> None:
        self.image_column, self.val_fraction, self.seed, self.validation = image_column, val_fraction, seed, validation

    def __call__(self, row: Mapping[str, Any]) -> bool:
        key = split_key(row[self.image_column])
        return is_validation_name(key, self.val_fraction, self.seed) == self.validation


def every_row(row: Mapping[str, Any]) -> bool:
    """The split filter of a named split: every row belongs to it."""
    return True


class RowReader:
    """A raw row (image undecoded) -> ``(image (3, R, R) in [-1, 1], label () int64)``, with its caption (str)
    appended when ``caption_column`` is set. Raises :class:`~varlib.data.shards.BadSampleError` for a missing or
    undecodable image, a missing or out-of-range label, or a missing caption.

    Args:
        image_column: the column of the image (``Image`` feature: ``{"bytes", "path"}``; or raw bytes, or a path).
        label_column: the column of the integer label in [0, num_classes); None labels every row 0.
        caption_column: the column of the caption string; None: no caption.
    """

    def __init__(self, image_column: str, label_column: str | None, caption_column: str | None,
                 num_classes: int) -> None:
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.num_classes = num_classes

    def __call__(self, row: Mapping[str, Any], what: str, transform: Callable,
                 generator: torch.Generator | None) -> tuple:
        label = 0
        if self.label_column is not None:
            label = row[self.label_column]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                raise BadSampleError(what, f"label {label!r} in column {self.label_column!r} is not an integer in "
                                           f"[0, {self.num_classes})")
        caption = None
        if self.caption_column is not None:
            caption = row[self.caption_column]
            if not isinstance(caption, str):
                raise BadSampleError(what, f"no caption: expected a string in column {self.caption_column!r}, got "
                                           f"{caption!r:.60}")
        source = image_source(row[self.image_column])
        if source is None:
            raise BadSampleError(what, f"no image in column {self.image_column!r}")
        try:
            image = decode_rgb_image(source)
        except ImageDecodeError as error:
            raise BadSampleError(what, str(error)) from None
        image_CHW = transform(image) if generator is None else transform(image, generator)
        item = image_CHW, torch.tensor(label, dtype=torch.int64)
        return item if caption is None else (*item, caption)


class HFRowDataset(Dataset):
    """Map-style rows ``rows`` of an Arrow-backed ``datasets.Dataset`` (image undecoded); item i is the
    :class:`RowReader`'s ``(image, label[, caption])`` of row ``rows[i]``, augmented with the generator of a
    :class:`~varlib.data.resumable.SeededIndex`, or None for a bad row (counted in ``skip_counter``)."""

    def __init__(self, table: Any, rows: Sequence[int], reader: RowReader, transform: Callable,
                 skip_counter: SkipCounter, name: str) -> None:
        self.table, self.rows, self.reader, self.transform = table, rows, reader, transform
        self.skip_counter, self.name = skip_counter, name

    @property
    def labels(self) -> torch.Tensor:
        """The label of each item, int64 (len(self),) (a missing label as 0: its row is skipped when read)."""
        if self.reader.label_column is None:
            return torch.zeros(len(self), dtype=torch.int64)
        column = self.table.select_columns([self.reader.label_column])[self.reader.label_column]
        return torch.tensor([column[row] or 0 for row in self.rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple | None:
        row = self.rows[index]
        try:
            return self.reader(self.table[row], f"row {row} of {self.name}", self.transform, sample_generator(index))
        except BadSampleError as error:
            self.skip_counter.record(error.what, error.reason)
            return None


class WorkerBatch(NamedTuple):
    """What a :class:`StreamedRows` worker sends in training: its batch (None: every row bad), the rows of its
    stream it has read so far, and whether its stream has ended (then ``batch`` is None and not trained on)."""

    worker: int
    rows_read: int
    batch: Any
    last: bool


def unchanged(item: Any) -> Any:
    """The DataLoader's collate for items a worker has batched itself."""
    return item


class StreamedRows(IterableDataset):
    """The rows of a streamed split (an ``IterableDataset`` of ``datasets``) that belong to it (``in_split``),
    decoded by ``reader`` with ``transform``; bad rows are None (counted in ``skip_counter``). Each DataLoader worker
    reads its shards of the stream (``datasets`` divides them).

    With ``batch_size`` (training), each worker yields :class:`WorkerBatch` es of ``batch_size`` rows (bad ones
    dropped) for :class:`StreamLoader`, its stream set to ``epoch`` and started after ``start_rows[worker]`` rows
    (read, not decoded); each row's augmentation is seeded by (``seed``, epoch, rank, worker, row). Without, it
    yields the items one by one, in order.
    """

    def __init__(self, stream: Any, reader: RowReader, transform: Callable, skip_counter: SkipCounter,
                 in_split: Callable[[Mapping[str, Any]], bool], name: str, batch_size: int | None = None,
                 seed: int = 0, rank: int = 0) -> None:
        self.stream, self.reader, self.transform, self.skip_counter = stream, reader, transform, skip_counter
        self.in_split, self.name, self.batch_size, self.seed, self.rank = in_split, name, batch_size, seed, rank
        self.epoch = 0
        self.start_rows: list[int] = []

    def decoded(self, worker: int, streams: int) -> Iterator[tuple[int, tuple | None]]:
        """``(rows read, item or None)`` of each row of this worker's stream in the split."""
        start = self.start_rows[worker] if self.start_rows else 0
        self.stream.set_epoch(self.epoch)
        for rows_read, row in enumerate(itertools.islice(self.stream, start, None), start=start + 1):
            if not self.in_split(row):
                continue
            generator = None
            if self.batch_size is not None:
                index = (rows_read * streams + worker) * 65536 + self.rank  # distinct over rows, workers and ranks
                generator = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, index))
            try:
                yield rows_read, self.reader(row, f"row {rows_read} of {self.name} (worker {worker})",
                                             self.transform, generator)
            except BadSampleError as error:
                self.skip_counter.record(error.what, error.reason)
                yield rows_read, None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, streams = (0, 1) if info is None else (info.id, info.num_workers)
        if self.batch_size is None:
            yield from (item for _, item in self.decoded(worker, streams))
            return
        batch, rows_read = [], self.start_rows[worker] if self.start_rows else 0
        for rows_read, item in self.decoded(worker, streams):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield WorkerBatch(worker, rows_read, collate_skipping_none(batch), False)
                batch = []
        yield WorkerBatch(worker, rows_read, None, True)


class StreamLoader(DataLoader):
    """Training DataLoader over a batching :class:`StreamedRows`: ``batches_per_epoch`` batches per epoch, taken
    from the workers in turn (0, 1, ..., skipping workers whose stream has ended), whose position Lightning keeps in
    its checkpoints.

    ``state_dict()`` is ``{"epoch", "batches", "ranks"}``: the epoch, the batches handed out in it (the same on every
    rank), and for each rank ``{"rows_read", "next_worker"}``: each worker's rows read for them and the worker whose
    batch comes next. Lightning saves rank 0's loader state, so ``state_dict`` gathers every rank's (a collective
    call, as Lightning's checkpoint saving is). Each ``__iter__`` is the next epoch, or the rest of a loaded one.
    Having a length, Lightning does not fetch ahead of training.
    """

    def __init__(self, dataset: StreamedRows, batches_per_epoch: int, num_workers: int, world_size: int, rank: int,
                 pin_memory: bool) -> None:
        # workers start anew each epoch: they copy the epoch and start rows of the dataset
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=unchanged,
                         pin_memory=pin_memory)
        self.batches_per_epoch = batches_per_epoch
        self.streams = max(num_workers, 1)
        self.world_size, self.rank = world_size, rank
        self.position = self.epoch_start(0)
        self.started = False  # whether position's epoch has been iterated (else the next __iter__ starts it)

    def epoch_start(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "batches": 0, "rows_read": [0] * self.streams, "next_worker": 0}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        if self.started or self.position["batches"] >= self.batches_per_epoch:  # else: epoch 0, or a loaded one
            self.position = self.epoch_start(self.position["epoch"] + 1)
        self.started = True
        self.dataset.epoch = self.position["epoch"]
        self.dataset.start_rows = list(self.position["rows_read"])
        return self.in_turn(super().__iter__())

    def in_turn(self, worker_batches: Iterator[WorkerBatch]) -> Iterator[Any]:
        """The workers' batches in their turn, ``position`` counting each one handed out."""
        position = self.position
        waiting: list[deque] = [deque() for _ in range(self.streams)]
        ended: set[int] = set()
        while position["batches"] < self.batches_per_epoch:
            worker = position["next_worker"]
            while not waiting[worker]:
                received = next(worker_batches, None)
                if received is None:
                    raise ValueError(self.short_stream_message())
                waiting[received.worker].append(received)
            received = waiting[worker].popleft()
            if received.last:
                ended.add(worker)
            if len(ended) == self.streams:
                raise ValueError(self.short_stream_message())
            position["next_worker"] = next(w % self.streams for w in range(worker + 1, worker + 1 + self.streams)
                                           if w % self.streams not in ended)
            if not received.last:
                position["rows_read"][worker] = received.rows_read
                position["batches"] += 1
                yield received.batch

    def short_stream_message(self) -> str:
        return (f"rank {self.rank}'s share of the stream ended after {self.position['batches']} of the "
                f"{self.batches_per_epoch} batches of an epoch: set data.rows_per_epoch lower, or give the data as "
                f"shards of equal size, as many as a multiple of ranks x loader workers")

    def state_dict(self) -> dict[str, Any]:
        mine = {"rows_read": list(self.position["rows_read"]), "next_worker": self.position["next_worker"]}
        ranks = [mine]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"epoch": self.position["epoch"], "batches": self.position["batches"], "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"epoch", "batches", "ranks"}:
            raise ValueError(f"expected a streamed train loader state with keys batches, epoch and ranks, got "
                             f"{sorted(state)}")
        found = (len(state["ranks"][0]["rows_read"]), len(state["ranks"]))
        if found != (self.streams, self.world_size):
            this_run = (self.streams, self.world_size)
            raise ValueError(f"a streamed epoch resumes with the loader workers and processes it ran with: the "
                             f"checkpoint has (streams per rank, ranks) = {found}, this run {this_run} "
                             f"(set data.num_workers={found[0] if found[0] > 1 else 0})")
        mine = state["ranks"][self.rank]
        self.position = {"epoch": int(state["epoch"]), "batches": int(state["batches"]),
                         "rows_read": [int(rows) for rows in mine["rows_read"]],
                         "next_worker": int(mine["next_worker"])}
        self.started = False


def check_splits_and_columns(path: str, splits: Mapping[str, Any], train_split: str, val_split: str | None,
                             columns: Sequence[str | None]) -> None:
    """Raises ValueError, naming what the dataset has, for a split or a column (None: not read) it does not have."""
    for role, split in (("train_split", train_split), ("val_split", val_split)):
        if split is not None and split not in splits:
            hint = " (val_split=null divides the train split by a hash)" if role == "val_split" else ""
            raise ValueError(f"{path} has no split {split!r} ({role}): it has {sorted(splits)}{hint}")
    for split in {train_split, val_split} - {None}:
        # a stream may know its columns only from its first row
        features = splits[split].features or dict.fromkeys(next(iter(splits[split])))
        missing = [column for column in columns if column is not None and column not in features]
        if missing:
            raise ValueError(f"{path} split {split!r} has no column {', '.join(map(repr, missing))}: it has "
                             f"{sorted(features)} (set data.image_column, data.label_column or "
                             f"data.caption_column)")


def dataset_classes(path: str, train: Any, label_column: str | None,
                    num_classes: int | None) -> tuple[int, list[str]]:
    """(number of classes, their names): ``num_classes`` given (names "0", "1", ...), one flat class without a
    label column, else the names of the train split's ``ClassLabel`` label column."""
    if num_classes is not None:
        return check_int_at_least("num_classes", num_classes, 1), [str(index) for index in range(num_classes)]
    if label_column is None:
        return 1, [FLAT_CLASS_NAME]
    label_feature = (train.features or {}).get(label_column)
    if isinstance(label_feature, import_datasets().ClassLabel):
        return len(label_feature.names), list(label_feature.names)
    raise ValueError(f"column {label_column!r} of {path} is {label_feature}, not a ClassLabel with class "
                     f"names: set data.num_classes")


class HFDataModule(ImageDataModule):
    """LightningDataModule over a Hugging Face dataset: batches of ``(images (B, 3, R, R) in [-1, 1], labels (B,))``
    (with ``captions``: ``(images, labels, captions (B str))``).

    Args:
        path: a Hub dataset id (``ILSVRC/imagenet-1k``) or a builder (``parquet``, ``arrow``, ``imagefolder``,
            ``webdataset``) with ``data_files`` or ``data_dir``.
        name: the dataset's configuration name.
        data_files, data_dir: a builder's files (a glob, a list, or ``{split: files}``) or folder.
        streaming: stream the rows (no download or Arrow cache first); else read them memory-mapped.
        train_split, val_split: split names; ``val_split=None`` takes ``val_fraction`` of the train split's rows
            (hashed by their image bytes, with ``split_seed``) for validation.
        image_column, label_column, caption_column: the columns read. ``label_column=None`` labels every row 0.
        captions: items carry the caption of ``caption_column`` (text-to-image).
        num_classes: the labels' range; None: the label column's ``ClassLabel`` names.
        rows_per_epoch: streamed training: the rows of an epoch over all ranks; None: the split's row count in the
            dataset's info (needed with a hash split).
        shuffle_buffer: streamed training: the shuffle buffer of ``datasets`` (rows).
        cache_dir: the ``datasets`` cache (None: its default).
        batch_size, num_workers, image_size, hflip, shuffle_seed, class_balance: as for the other image
            DataModules (``class_balance`` needs ``streaming=false``).
    Raises ValueError before reading any image for a split or column the dataset does not have (naming those it
    has), or a Hub that cannot be reached.
    """

    train_set: HFRowDataset | None = None
    val_set: HFRowDataset | None = None

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: Any = None,
        data_dir: str | None = None,
        streaming: bool = True,
        train_split: str = "train",
        val_split: str | None = "validation",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        image_column: str = "image",
        label_column: str | None = "label",
        caption_column: str = "caption",
        captions: bool = False,
        num_classes: int | None = None,
        rows_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        image_size: int = 256,
        hflip: bool = False,
        shuffle_seed: int = 0,
        class_balance: float = 0.0,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, hflip, shuffle_seed, class_balance)
        self._set_reading_options(path, streaming, captions, val_fraction, split_seed, shuffle_buffer, rows_per_epoch)
        splits = load_splits(path, name, data_files, data_dir, streaming, cache_dir)
        read = {train_split, val_split} - {None}
        check_splits_and_columns(path, splits, train_split, val_split,
                                 [image_column, label_column, caption_column if captions else None])
        self.train_split, self.val_split = train_split, val_split
        self.num_classes, self.class_names = dataset_classes(path, splits[train_split], label_column, num_classes)
        if isinstance((splits[train_split].features or {}).get(image_column), import_datasets().Image):
            splits = {split: splits[split].cast_column(image_column, import_datasets().Image(decode=False))
                      for split in read}
        self.splits = splits
        self.image_column = image_column
        self.reader = RowReader(image_column, label_column, caption_column if captions else None, self.num_classes)

    def _set_reading_options(self, path: str, streaming: bool, captions: bool, val_fraction: float, split_seed: int,
                             shuffle_buffer: int, rows_per_epoch: int | None) -> None:
        """Checks and keeps the options of how rows are read (raises ValueError for one out of its range)."""
        for flag, value in (("streaming", streaming), ("captions", captions)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be a bool, got {value!r}")
        if streaming and self.class_balance:
            raise ValueError(f"class_balance needs every label first: use streaming=false, got class_balance="
                             f"{self.class_balance} with streaming=true")
        self.path, self.streaming, self.captions = path, streaming, captions
        self.val_fraction = check_open_fraction("val_fraction", val_fraction)
        self.split_seed = check_int_at_least("split_seed", split_seed, 0)
        self.shuffle_buffer = check_int_at_least("shuffle_buffer", shuffle_buffer, 1)
        self.rows_per_epoch = None if rows_per_epoch is None else check_int_at_least("rows_per_epoch",
                                                                                      rows_per_epoch, 1)

    def split_source(self, split: str) -> tuple[Any, Callable[[Mapping[str, Any]], bool], str]:
        """The dataset holding ``split`` ("train" or "val"), the filter of its rows, and its name for messages."""
        if split == "train":
            hashed = self.val_split is None
            return (self.splits[self.train_split], HashSplit(self.image_column, self.val_fraction, self.split_seed,
                                                             False) if hashed else every_row, self.train_split)
        if self.val_split is not None:
            return self.splits[self.val_split], every_row, self.val_split
        return (self.splits[self.train_split],
                HashSplit(self.image_column, self.val_fraction, self.split_seed, True), f"{self.train_split} (hashed)")

    def row_dataset(self, split: str, transform: Callable) -> HFRowDataset:
        """The map-style rows of ``split`` (``streaming=false``)."""
        table, in_split, name = self.split_source(split)
        if in_split is every_row:
            rows: Sequence[int] = range(len(table))
        else:  # one pass over the image bytes, no decoding
            images = table.select_columns([self.image_column])
            rows = [row for row in range(len(table)) if in_split(images[row])]
        return HFRowDataset(table, rows, self.reader, transform, self.skip_counters[split], f"{self.path} {name}")

    def setup(self, stage: str | None = None) -> None:
        if self.streaming:
            return
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.row_dataset("train", ImageTransform(self.image_size, train=True, hflip=self.hflip))
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self.row_dataset("val", ImageTransform(self.image_size, train=False))

    def streamed_rows(self, split: str, transform: Callable, train: bool = False) -> StreamedRows:
        """This rank's share of the streamed ``split``, shuffled for training."""
        stream, in_split, name = self.split_source(split)
        if train:
            # the buffer fills from one shard at a time: datasets 5 interleaves 10 by default, row by row, at 50
            # rows/s against 8,500 (benchmarks/hf_loader.py)
            parameters = signature(stream.shuffle).parameters
            one_shard = {"max_buffer_input_shards": 1} if "max_buffer_input_shards" in parameters else {}
            stream = stream.shuffle(seed=self.shuffle_seed, buffer_size=self.shuffle_buffer, **one_shard)
        world_size, rank = world_and_rank(None, None)
        if world_size > 1:
            import_datasets()
            from datasets.distributed import split_dataset_by_node

            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        return StreamedRows(stream, self.reader, transform, self.skip_counters[split], in_split,
                            f"{self.path} {name}", self.batch_size if train else None, self.shuffle_seed, rank)

    def epoch_rows(self) -> int:
        """Rows of a streamed training epoch over all ranks."""
        if self.rows_per_epoch is not None:
            return self.rows_per_epoch
        info = self.splits[self.train_split].info.splits
        if self.val_split is None or not info or self.train_split not in info:
            raise ValueError(f"streamed training needs the rows of an epoch: set data.rows_per_epoch ("
                             f"{'the dataset info has no row count' if self.val_split is not None else 'a hash split'}"
                             f" of {self.path} {self.train_split!r})")
        return info[self.train_split].num_examples

    def train_dataloader(self) -> DataLoader:
        if not self.streaming:
            return super().train_dataloader()
        transform = ImageTransform(self.image_size, train=True, hflip=self.hflip)
        world_size, rank = world_and_rank(None, None)
        batches = self.epoch_rows() // (world_size * self.batch_size)
        if batches < 1:
            raise ValueError(f"expected at least one batch of {self.batch_size} per rank, got {self.epoch_rows()} "
                             f"rows per epoch for {world_size} ranks")
        return StreamLoader(self.streamed_rows("train", transform, train=True), batches, self.num_workers,
                            world_size, rank, torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        if not self.streaming:
            return super().val_dataloader()
        return self.make_loader(self.streamed_rows("val", ImageTransform(self.image_size, train=False)), train=False)

    def tokenizing_units(self, split: str, transform: Callable, shard_size: int) -> list[Unit]:
        """Streamed: one unit per shard of the stream (a file of a local builder; ``shard_size`` does not apply),
        read in order with ``transform``; else units of ``shard_size`` rows."""
        if not self.streaming:
            return super().tokenizing_units(split, transform, shard_size)
        stream, in_split, name = self.split_source(split)
        counter = self.skip_counters[split]

        def shard_loader(index: int) -> DataLoader:
            shard = stream.shard(num_shards=stream.n_shards, index=index)
            rows = StreamedRows(shard, self.reader, transform, counter, in_split, f"{self.path} {name} shard {index}")
            return self.make_loader(rows, train=False)

        return [Unit(index, (lambda index=index: shard_loader(index)), None, lambda: counter.value)
                for index in range(stream.n_shards)]
