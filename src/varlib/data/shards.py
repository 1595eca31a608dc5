"""Datasets from WebDataset tar shards, read by index (local training shards) or streamed.

A shard is a tar file whose members are grouped into samples by basename: `000123.jpg` and
`000123.cls` form one sample with keys 'jpg' and 'cls'. Shard specs may be local paths, globs,
brace patterns (`shard-{000000..000099}.tar`), '::'-separated lists, `pipe:` shell commands, or
fsspec URLs (`s3://...`, `gs://...`, `hf://...`; the matching fsspec backend must be installed).

Training reads local shards by index (`IndexedShardDataset`, each file's offset listed once): the
samples form one map-style set, shuffled, shared among ranks and resumed mid-epoch at the exact sample like the
other map-style sets (`varlib.data.resumable`). Remote or `pipe:` shards are streamed instead (`indexed=False`):
shard order and a shuffle buffer, no mid-epoch resume. Validation is always streamed.

With captions (text-to-image), a sample's caption is its `txt` entry (UTF-8 text), else the `caption` (or `text`)
field of its `json` entry; the label stays `label_key`'s. A sample without one is skipped and counted.

Bad data never stops the stream: unreadable shards, undecodable images, missing or out-of-range
labels are passed to `CountingHandler`, which counts them in a `SkipCounter`, logs a warning
naming the sample and its shard, and continues. Bad samples are dropped before batching, so
batches stay full. A truncated shard typically counts twice: its cut member and its broken tail.
"""

from __future__ import annotations

import glob
import json
import math
import os
import tarfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from varlib.data.base import ImageDataModule, Unit, check_int_at_least
from varlib.data.decoding import ImageDecodeError, decode_rgb_image
from varlib.data.resumable import sample_generator
from varlib.data.skipping import SkipCounter
from varlib.data.transforms import ImageTransform

GLOB_CHARACTERS = ("*", "?", "[")
LOCAL_SCHEMES = ("", "file")
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text")


class BadSampleError(ValueError):
    """A sample that cannot be used; `what` names it (key and shard), `reason` says why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class CountingHandler:
    """WebDataset exception handler: count the failure, log a warning, continue the stream."""

    def __init__(self, skip_counter: SkipCounter) -> None:
        self.skip_counter = skip_counter

    def __call__(self, error: Exception) -> bool:
        if isinstance(error, BadSampleError):
            self.skip_counter.record(error.what, error.reason)
        else:
            self.skip_counter.record("unreadable shard data", f"{type(error).__name__}: {error}")
        return True


def _expand_glob(url: str) -> list[str]:
    """One URL -> the shard URLs it denotes; local paths are checked to exist."""
    parsed = urlparse(url)
    if parsed.scheme == "pipe":
        return [url]
    if parsed.scheme in LOCAL_SCHEMES:
        path = url2pathname(parsed.path) if parsed.scheme == "file" else os.path.expanduser(url)
        if any(char in path for char in GLOB_CHARACTERS):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"no shard files match the pattern {url!r}")
            return matches
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard file not found: {url!r}")
        return [url]
    if any(char in parsed.path for char in GLOB_CHARACTERS):
        filesystem, path = fsspec.core.url_to_fs(url)
        matches = sorted(filesystem.glob(path))
        if not matches:
            raise FileNotFoundError(f"no shard files match the pattern {url!r}")
        return [filesystem.unstrip_protocol(match) for match in matches]
    return [url]


def resolve_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard spec (a string or a list of strings) -> flat list of shard URLs, in order.

    Braces and '::' lists are expanded first, then globs (local via `glob`, remote via fsspec).
    Raises ValueError for an empty spec and FileNotFoundError for local shards that do not exist.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"shard spec must be a non-empty string or list of non-empty strings, got {spec!r}")
    return [shard for pattern in patterns for url in expand_urls(pattern) for shard in _expand_glob(url)]


def open_shard(url: str) -> BinaryIO:
    """Open a shard for reading: local files and `pipe:` commands via webdataset, else via fsspec."""
    scheme = urlparse(url).scheme
    if scheme in LOCAL_SCHEMES or scheme == "pipe":
        return wds.gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def open_shards(
    sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: dict(url=...) -> dict(url=..., stream=...); unopenable shards go to `handler`."""
    for source in sources:
        try:
            stream = open_shard(source["url"])
        except Exception as error:  # any failure to open a shard (missing file, network, command)
            if handler(error):
                continue
            raise
        yield {**source, "stream": stream}


def sample_caption(sample: dict[str, Any], what: str) -> str:
    """The caption of a raw sample: its `txt` entry (UTF-8, stripped of surrounding white space), else the `caption`
    (or `text`) string of its `json` entry. Raises `BadSampleError` when it has neither or they cannot be read."""
    if "txt" in sample:
        try:
            return sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise BadSampleError(what, f"txt entry is not UTF-8 text ({error})") from None
    if "json" not in sample:
        entries = sorted(key for key in sample if not key.startswith("__"))
        raise BadSampleError(what, f"no caption: expected a 'txt' entry or a 'json' entry with a 'caption' or 'text' "
                                   f"field, got entries {entries}")
    try:
        fields = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError(what, f"json entry is not JSON ({error})") from None
    field = next((name for name in CAPTION_FIELDS if isinstance(fields, dict) and name in fields), None)
    if field is None or not isinstance(fields[field], str):
        raise BadSampleError(what, f"no caption: expected the json entry to be an object with a 'caption' or 'text' "
                                   f"string, got {sample['json'][:80]!r}")
    return fields[field]


class ShardSampleDecoder:
    """Callable: raw WebDataset sample dict -> `(image (3, R, R) in [-1, 1], label () int64)`, with its caption
    (str, :func:`sample_caption`) appended when `captions`.

    Args:
        transform: RGB PIL image -> tensor (3, R, R), e.g. `ImageTransform`.
        num_classes: labels must lie in [0, num_classes).
        label_key: sample key holding the integer label as text (e.g. 'cls'); None labels all 0.
        image_keys: sample keys tried in order for the encoded image.
        captions: also read each sample's caption.
    Raises `BadSampleError` for a missing/undecodable image, a missing/invalid label or (with `captions`) a
    missing caption.
    """

    def __init__(
        self,
        transform: Callable,
        num_classes: int,
        label_key: str | None = "cls",
        image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
        captions: bool = False,
    ) -> None:
        self.transform = transform
        self.num_classes = num_classes
        self.label_key = label_key
        self.image_keys = tuple(image_keys)
        self.captions = captions

    def label(self, sample: dict[str, Any], what: str) -> int:
        if self.label_key is None:
            return 0
        if self.label_key not in sample:
            entries = sorted(key for key in sample if not key.startswith("__"))
            raise BadSampleError(what, f"no {self.label_key!r} entry (has {entries})")
        raw = sample[self.label_key]
        try:
            label = int(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, ValueError, TypeError):
            raise BadSampleError(what, f"label {repr(raw)[:40]} is not an integer") from None
        if not 0 <= label < self.num_classes:
            raise BadSampleError(what, f"label {label} outside [0, {self.num_classes})")
        return label

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> tuple:
        """``generator`` draws the random augmentation (None: torch's global generator)."""
        what = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        image_key = next((key for key in self.image_keys if key in sample), None)
        if image_key is None:
            raise BadSampleError(what, f"no image entry among {list(self.image_keys)}")
        label = self.label(sample, what)
        caption = sample_caption(sample, what) if self.captions else None
        try:
            image = decode_rgb_image(sample[image_key])
        except ImageDecodeError as error:
            raise BadSampleError(what, str(error)) from None
        image_CHW = self.transform(image) if generator is None else self.transform(image, generator)
        item = image_CHW, torch.tensor(label, dtype=torch.int64)
        return item if caption is None else (*item, caption)


def local_shard_path(url: str) -> str:
    """The file of a local shard URL (a path or file://); ValueError for any other."""
    parsed = urlparse(url)
    if parsed.scheme not in LOCAL_SCHEMES:
        raise ValueError(f"indexed reading needs local shard files, got {url!r}: copy the shards to a local disk, or "
                         "stream them with indexed=false (a resumed run then starts its epoch again)")
    return url2pathname(parsed.path) if parsed.scheme == "file" else os.path.expanduser(url)


def list_shard_members(path: str) -> Iterator[tuple[str, str, int, int]]:
    """``(key, extension, data offset, size)`` of each file in an uncompressed tar, in order (webdataset's naming:
    ``a/000123.seg.png`` is key ``a/000123``, extension ``seg.png``; names without an extension are left out)."""
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, extension = base_plus_ext(info.name)
            if info.isfile() and key is not None:
                yield key, extension, info.offset_data, info.size


class IndexedShardDataset(Dataset):
    """The samples of local WebDataset shards as one map-style set: row i is the i-th sample in shard order.

    Every shard's file offsets are listed once (``tarfile``); a row is then read with ``os.pread``, so any order (a
    seeded shuffle over all shards, shared among ranks) costs the same, nothing stays open, and a resumed run
    starts at its row. The listing is kept in numpy arrays (24 bytes per file), shared by forked workers. Item
    ``i`` is the decoder's ``(image (3, R, R) in [-1, 1], label () int64[, caption])``, augmented with the
    generator of a :class:`~varlib.data.resumable.SeededIndex`, or None for a bad sample (counted in
    ``skip_counter``). A shard that cannot be listed (a truncated or compressed tar) is counted once and left out.

    Args:
        urls: local shard paths (or file:// URLs) of uncompressed tars.
        decoder: raw sample dict -> (image, label[, caption]).
        skip_counter: where bad samples and shards are counted.
    """

    def __init__(self, urls: Sequence[str], decoder: ShardSampleDecoder, skip_counter: SkipCounter) -> None:
        self.decoder = decoder
        self.skip_counter = skip_counter
        self.paths: list[str] = []
        extension_ids: dict[str, int] = {}
        files: list[tuple[int, int, int]] = []  # (offset, size, extension id) of each file
        sample_starts, sample_shards = [], []  # each sample's first file and its shard
        first_error = None
        for url in urls:
            path = local_shard_path(url)
            try:
                listing = list(list_shard_members(path))
            except (tarfile.TarError, OSError) as error:
                first_error = first_error or f"{url}: {type(error).__name__}: {error}"
                skip_counter.record(f"shard {url}", f"cannot list its files ({type(error).__name__}: {error})")
                continue
            last_key = None
            for key, extension, offset, size in listing:
                if key != last_key:
                    sample_starts.append(len(files))
                    sample_shards.append(len(self.paths))
                    last_key = key
                files.append((offset, size, extension_ids.setdefault(extension, len(extension_ids))))
            self.paths.append(path)
        if not sample_starts:
            raise ValueError(f"expected samples in the shards {list(urls)[:3]}{'...' if len(urls) > 3 else ''}, "
                             f"got none that can be read (first error: {first_error})")
        self.extensions = list(extension_ids)
        self.files = np.array(files, dtype=np.int64).reshape(-1, 3)
        self.sample_starts = np.array([*sample_starts, len(files)], dtype=np.int64)
        self.sample_shards = np.array(sample_shards, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.sample_shards)

    def __getitem__(self, index: int) -> tuple | None:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} outside [0, {len(self)})")
        path = self.paths[self.sample_shards[index]]
        what = f"row {int(index)} of {path}"
        sample: dict[str, Any] = {"__key__": f"row {int(index)}", "__url__": path}
        try:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                for offset, size, extension in self.files[self.sample_starts[index]:self.sample_starts[index + 1]]:
                    data = os.pread(descriptor, int(size), int(offset))
                    if len(data) != size:
                        raise OSError(f"expected {size} bytes at offset {offset}, got {len(data)}: the file shrank")
                    sample[self.extensions[extension]] = data
            finally:
                os.close(descriptor)
        except OSError as error:
            self.skip_counter.record(what, f"{type(error).__name__}: {error}")
            return None
        try:
            return self.decoder(sample, sample_generator(index))
        except BadSampleError as error:
            self.skip_counter.record(error.what, error.reason)
            return None


def shard_pipeline(
    urls: list[str],
    decoder: ShardSampleDecoder,
    handler: CountingHandler,
    train: bool,
    shuffle_buffer: int = 0,
    resampled: bool = False,
) -> wds.DataPipeline:
    """Iterable of decoded `(image, label[, caption])` samples (the decoder's) streamed from `urls`.

    Without resampling, shards are split disjointly across distributed ranks, then across
    DataLoader workers (a rank or worker with no shard yields nothing), and shard order is
    shuffled for training. With `resampled=True` every worker draws shards at random with
    replacement forever (bound the epoch with `DataPipeline.with_epoch`). Training samples go
    through a shuffle buffer of `shuffle_buffer` samples (0 disables it).
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        if train:
            stages.append(wds.shuffle(len(urls), initial=len(urls)))
    stages += [
        wds.pipelinefilter(open_shards)(handler),
        wds.pipelinefilter(tar_file_expander)(handler=handler),
        wds.pipelinefilter(group_by_keys)(handler=handler),
    ]
    if train and shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer))
    stages.append(wds.map(decoder, handler=handler))
    return wds.DataPipeline(*stages)


def check_shard_reading(indexed: bool, resampled: bool, samples_per_epoch: int | None) -> None:
    """Raises ValueError for shard reading options that do not go together: resampling and a fixed epoch length
    are for streamed (not indexed) shards, and resampling needs the epoch length."""
    if samples_per_epoch is not None:
        check_int_at_least("samples_per_epoch", samples_per_epoch, 1)
    if resampled and samples_per_epoch is None:
        raise ValueError("resampled=True streams forever: set samples_per_epoch to an int >= 1, got None")
    if not isinstance(indexed, bool):
        raise ValueError(f"indexed must be a bool, got {indexed!r}")
    if indexed and (resampled or samples_per_epoch is not None):
        raise ValueError("resampled and samples_per_epoch apply to streamed shards (indexed=false), got "
                         f"resampled={resampled}, samples_per_epoch={samples_per_epoch} with indexed=true")


class WebDatasetDataModule(ImageDataModule):
    """LightningDataModule of `(image, label)` samples (`(image, label, caption)` with `captions`) from WebDataset
    tar shards.

    Training with `indexed=True` (local shards) reads them by index (`IndexedShardDataset`): the order and
    augmentation depend only on (shuffle_seed, epoch, row), and a run killed mid-epoch resumes at the next sample,
    every rank and worker included (`varlib.data.resumable`). With `indexed=False` the shards are streamed (any
    URL) in shard order through a shuffle buffer, and a resumed run starts its epoch again. There is no
    `class_balance` (drawing rows by class needs every label first: use a folder or a token cache of the data).

    Args:
        train_urls: shard spec of the training split (see module docstring).
        val_urls: shard spec of the validation split; None when there is no validation data
            (then run the Trainer with `limit_val_batches=0`).
        num_classes: number of classes; labels outside [0, num_classes) are skipped and counted.
        batch_size, num_workers: DataLoader settings (train batches drop the last partial batch).
        image_size: output resolution R of the official VAR transform.
        hflip: random horizontal flips for training.
        label_key: sample key with the integer label ('cls'); None gives every sample label 0.
        image_keys: sample keys tried in order for the encoded image.
        indexed: read local training shards by index (exact resume); False streams them.
        shuffle_seed: seeds the indexed training order and augmentation (with the epoch and row).
        shuffle_buffer: streamed training sample shuffle buffer size (0 disables).
        resampled: stream training shards drawn with replacement (recommended for multi-GPU streams,
            where ranks must see equally many batches); requires samples_per_epoch and indexed=False.
        samples_per_epoch: streamed training samples per epoch over all ranks and workers; None streams
            each rank's shards once per epoch.
        captions: samples are `(image, label, caption)` (text-to-image), captioned by their `txt` entry or their
            `json` entry's `caption`/`text` (:func:`sample_caption`); samples without a caption are skipped and
            counted.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None = None,
        num_classes: int = 1000,
        batch_size: int = 64,
        num_workers: int = 8,
        image_size: int = 256,
        hflip: bool = False,
        label_key: str | None = "cls",
        image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        indexed: bool = True,
        shuffle_seed: int = 0,
        captions: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, hflip, shuffle_seed)
        if not isinstance(captions, bool):
            raise ValueError(f"captions must be a bool, got {captions!r}")
        self.captions = captions
        self.num_classes = check_int_at_least("num_classes", num_classes, 1)
        self.class_names = [str(index) for index in range(num_classes)]
        self.shuffle_buffer = check_int_at_least("shuffle_buffer", shuffle_buffer, 0)
        check_shard_reading(indexed, resampled, samples_per_epoch)
        self.indexed = indexed
        if not image_keys or isinstance(image_keys, str):
            raise ValueError(f"image_keys must be a non-empty list of sample keys, got {image_keys!r}")
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.label_key = label_key
        self.image_keys = tuple(image_keys)
        self.train_urls = resolve_shard_urls(train_urls)
        self.val_urls = None if val_urls is None else resolve_shard_urls(val_urls)

    def _decoder(self, train: bool) -> ShardSampleDecoder:
        transform = ImageTransform(self.image_size, train=train, hflip=self.hflip)
        return ShardSampleDecoder(transform, self.num_classes, self.label_key, self.image_keys, self.captions)

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def tokenizing_units(self, split: str, transform: Callable, shard_size: int) -> list[Unit]:
        """One unit per tar of the split (``shard_size`` does not apply: a tar is the unit a re-run skips), its
        samples decoded with ``transform``."""
        urls = self.train_urls if split == "train" else self.val_urls
        if urls is None:
            raise ValueError(f"split {split!r} needs data.val_urls, got null (or leave it out of splits)")
        counter = self.skip_counters[split]
        decoder = ShardSampleDecoder(transform, self.num_classes, self.label_key, self.image_keys, self.captions)

        def tar_loader(url: str) -> DataLoader:
            return self.make_loader(shard_pipeline([url], decoder, CountingHandler(counter), train=False), train=False)

        return [Unit(i, (lambda url=url: tar_loader(url)), None, lambda: counter.value) for i, url in enumerate(urls)]

    def train_dataloader(self) -> DataLoader:
        if self.indexed:
            dataset = IndexedShardDataset(self.train_urls, self._decoder(True), self.skip_counters["train"])
            return self.make_loader(dataset, train=True)
        handler = CountingHandler(self.skip_counters["train"])
        pipeline = shard_pipeline(
            self.train_urls, self._decoder(True), handler, True, self.shuffle_buffer, self.resampled
        )
        if self.samples_per_epoch is not None:
            streams = self._world_size() * max(self.num_workers, 1)
            pipeline = pipeline.with_epoch(math.ceil(self.samples_per_epoch / streams))
        return self.make_loader(pipeline, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_urls is None:
            raise ValueError("val_dataloader needs val_urls, got None; set it or use Trainer(limit_val_batches=0)")
        handler = CountingHandler(self.skip_counters["val"])
        pipeline = shard_pipeline(self.val_urls, self._decoder(False), handler, train=False)
        return self.make_loader(pipeline, train=False)
