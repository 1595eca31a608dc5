"""Token cache: datasets pre-tokenised into multi-scale token maps, so VAR trains without the encoder.

Layout of a cache directory (written by ``varlib-tokenize``, see ``varlib.data.tokenizing``)::

    index.json                   {"format", "patch_nums", "vocab_size", "num_classes",
                                  "splits": {split: [shard files]}, "skipped": {split: unreadable images}}
    {split}-{i:05d}.safetensors  tokens (N, L) or (N, C, L) int16/int32, labels (N,) int64 [, tokens_flip]
                                 [, caption_bytes (UTF-8, uint8), caption_offsets (N+1,) int64]
                                 [, text_tokens (N, T, D) float32, text_mask (N, T) uint8, text_pooled (N, D)]
    text_encoder.safetensors     [the frozen text encoder that computed text_*: weights, config in the metadata]

Each row holds the K token maps of one image concatenated in scale order (the first pn_0^2 entries are
scale 0, ...). A captioned dataset's shards keep each row's caption (text-to-image training encodes them with
its text encoder), and with a frozen text encoder their features (training then does not run it; the model's
encoder takes the cache's weights, ``text_encoder.safetensors``). With C random crops per image (``crops``) a
training sample picks one crop at random, and with ``with_flip`` the horizontally flipped twin half of the time
(the official augmentation-free recipe is one centre crop, no flip).

Shards are memory-mapped, never loaded whole: a process holds the labels (8 bytes per image) and touches
only the token rows it reads. :class:`RankBlockSampler` gives each rank contiguous blocks of rows, so a
rank reads about 1/world_size of the cache per epoch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from varlib.data.resumable import (
    ClassBalancedSampler,
    ResumableLoader,
    ResumableSampler,
    check_class_balance,
    sample_generator,
)

FORMAT = "varlib-token-cache/1"
#: the dataset's class names beside ``index.json`` (written by varlib-tokenize when the dataset has them)
CLASS_NAMES_FILE = "class_names.json"
#: the frozen text encoder whose features the shards hold (written by varlib-tokenize text_encoder=...)
TEXT_ENCODER_FILE = "text_encoder.safetensors"
SAFETENSORS_DTYPES = {"U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F32": np.float32}


def memmap_safetensors(path: str | os.PathLike) -> dict[str, np.memmap]:
    """Read-only memory maps of the integer tensors of a ``.safetensors`` file, without reading their data.

    The format is an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
    data_offsets}}`` and the raw little-endian data.
    """
    with open(path, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_size))
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected one of {list(SAFETENSORS_DTYPES)}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            arrays[name] = np.zeros(shape, SAFETENSORS_DTYPES[entry["dtype"]])
        else:
            arrays[name] = np.memmap(path, dtype=SAFETENSORS_DTYPES[entry["dtype"]], mode="r",
                                     offset=8 + header_size + begin, shape=shape)
    return arrays


class TokenDataset(Dataset):
    """Rows of a cache split: ``(tokens (L,) int64, label)``, with ``captions`` ``(tokens, label, caption)``, and
    with ``text_features`` also the caption's precomputed features ``{"tokens": (T, D), "mask": (T,) bool,
    "pooled": (D,)}`` (T: the split's longest, padded with masked-out zeros), read lazily from memory-mapped shards.

    ``train=True`` picks one of the stored crops and, with ``use_flip``, the mirrored twin half of the time;
    otherwise the first crop, unflipped. ``labels`` (N,) is held in memory; token rows, captions and features are not.
    """

    def __init__(self, root: str | os.PathLike, split: str, use_flip: bool = False, train: bool = False,
                 captions: bool = False, text_features: bool = False):
        root = Path(root)
        index = read_index(root)
        if split not in index["splits"]:
            raise ValueError(f"token cache {root} has no split {split!r}; it has {sorted(index['splits'])}")
        self.paths = [root / name for name in index["splits"][split]]
        if not self.paths:
            raise ValueError(f"token cache {root} split {split!r} is empty")
        self.use_flip, self.train = use_flip, train
        shards = [memmap_safetensors(p) for p in self.paths]
        if use_flip and not all("tokens_flip" in s for s in shards):
            raise ValueError(f"token cache {root} split {split!r} was written without flipped twins (with_flip)")
        if captions and not all("caption_offsets" in s for s in shards):
            raise ValueError(f"token cache {root} split {split!r} has no captions: expected one written from a "
                             f"captioned dataset (varlib-tokenize data.captions=true)")
        if text_features and not (captions and all("text_pooled" in s for s in shards)):
            raise ValueError(f"text features come with captions from a cache written with a frozen text encoder "
                             f"(varlib-tokenize data.captions=true text_encoder=...): expected captions=True and "
                             f"shards with text_*, got captions={captions} and split {split!r} of {root}")
        self.captions, self.text_features = captions, text_features
        self.text_length = max(s["text_tokens"].shape[1] for s in shards) if text_features else 0
        self.labels = torch.from_numpy(np.concatenate([np.asarray(s["labels"]) for s in shards]))
        self.offsets = np.cumsum([0] + [s["labels"].shape[0] for s in shards]).tolist()
        self.crops = shards[0]["tokens"].shape[1] if shards[0]["tokens"].ndim == 3 else 1
        self._shards: list[dict[str, np.memmap]] | None = None  # opened lazily in each DataLoader worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _locate(self, i: int) -> tuple[dict[str, np.memmap], int]:
        """The arrays of the shard holding image ``i`` and its row there."""
        if self._shards is None:
            self._shards = [memmap_safetensors(p) for p in self.paths]
        shard = bisect.bisect_right(self.offsets, i) - 1
        return self._shards[shard], i - self.offsets[shard]

    def row(self, i: int, crop: int = 0, flipped: bool = False) -> torch.Tensor:
        """The stored tokens (L,) of image ``i`` (its ``crop``-th crop, mirrored twin if ``flipped``)."""
        arrays, j = self._locate(i)
        row = arrays["tokens_flip" if flipped else "tokens"][j]
        return torch.from_numpy(np.array(row[crop] if self.crops > 1 else row))

    def caption(self, i: int) -> str:
        """The caption of image ``i``."""
        arrays, j = self._locate(i)
        begin, end = arrays["caption_offsets"][j: j + 2]
        return bytes(arrays["caption_bytes"][begin:end]).decode()

    def features(self, i: int) -> dict[str, torch.Tensor]:
        """The precomputed text features of image ``i``'s caption, padded to :attr:`text_length` tokens."""
        arrays, j = self._locate(i)
        tokens_TD = torch.from_numpy(np.array(arrays["text_tokens"][j]))
        mask_T = torch.from_numpy(np.array(arrays["text_mask"][j])).bool()
        extra = self.text_length - tokens_TD.shape[0]
        return {"tokens": F.pad(tokens_TD, (0, 0, 0, extra)), "mask": F.pad(mask_T, (0, extra)),
                "pooled": torch.from_numpy(np.array(arrays["text_pooled"][j]))}

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        crop, flipped = 0, False
        if self.train:  # a SeededIndex (training sampler) fixes the draw; a plain index draws from the global RNG
            generator = sample_generator(i)
            crop = int(torch.randint(self.crops, (), generator=generator))
            flipped = self.use_flip and bool(torch.rand((), generator=generator) < 0.5)
        item = self.row(i, crop, flipped).long(), self.labels[i]
        if self.captions:
            item = (*item, self.caption(i))
        return (*item, self.features(i)) if self.text_features else item


class RankBlockSampler(ResumableSampler):
    """Each epoch: the rows cut into blocks of ``block_size`` consecutive rows, the blocks shuffled with
    ``seed + epoch`` and dealt to the ranks in turn, then each rank's rows shuffled.

    A rank thus reads only its share of the memory-mapped cache, in long contiguous runs, and the order depends
    only on (seed, epoch, rank, world size): a resumed run replays it, from the middle of an epoch too (see
    :class:`ResumableSampler`). Every rank yields the same number of rows (the shortest share), as DDP needs.
    """

    def __init__(self, num_rows: int, block_size: int = 1024, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        super().__init__(num_rows, num_replicas, rank, seed)
        if block_size < 1:
            raise ValueError(f"expected block_size >= 1, got {block_size}")
        self.block_size = min(block_size, num_rows // self.num_replicas)  # every rank gets at least one block
        full, rest = divmod(num_rows, self.block_size)
        blocks_per_rank = (full + (rest > 0)) // self.num_replicas
        # the shortest share: blocks_per_rank blocks, the partial one among them
        self.num_samples = blocks_per_rank * self.block_size - (self.block_size - rest if rest else 0)

    def _blocks(self, generator: torch.Generator) -> list[range]:
        starts = torch.randperm(math.ceil(self.num_rows / self.block_size), generator=generator).tolist()
        return [range(s * self.block_size, min((s + 1) * self.block_size, self.num_rows)) for s in starts]

    def epoch_rows(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        mine = [i for block in self._blocks(generator)[self.rank::self.num_replicas] for i in block]
        order = torch.randperm(len(mine), generator=generator)[: self.num_samples].tolist()
        return [mine[j] for j in order]


def read_text_encoder_config(path: str | os.PathLike) -> dict:
    """The config of the text encoder saved at ``path`` (:func:`varlib.data.tokenizing.write_text_encoder`)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {})["config"])


def read_index(root: str | os.PathLike) -> dict:
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no token cache at {root}: expected {path} (write one with varlib-tokenize)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a varlib token cache (format {index.get('format')!r}, expected {FORMAT!r})")
    return index


class TokenCacheDataModule(L.LightningDataModule):
    """Batches ``(tokens (B, L) int64, labels (B,))`` from a token cache written by ``varlib-tokenize``; with
    ``captions``, ``(tokens, labels, captions (B str))`` from a cache of a captioned dataset (text-to-image); with
    ``text_features`` as well, ``(tokens, labels, captions, {"tokens": (B,T,D), "mask": (B,T), "pooled": (B,D)})``,
    the features of the frozen encoder at :attr:`text_encoder_path`.

    The training order depends only on ``shuffle_seed`` and the epoch, and the train loader's position is saved in
    checkpoints (:class:`~varlib.data.resumable.ResumableLoader`), so a resumed run replays it exactly, mid-epoch too;
    under DDP/FSDP each rank reads its own blocks of ``block_size`` rows (:class:`RankBlockSampler`).
    ``class_balance`` > 0 draws the rows class-balanced instead (:class:`ClassBalancedSampler`).
    """

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 0, use_flip: bool = False,
                 train_split: str = "train", val_split: str = "val", shuffle_seed: int = 0, block_size: int = 1024,
                 class_balance: float = 0.0, captions: bool = False, text_features: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root, self.batch_size, self.num_workers, self.use_flip = root, batch_size, num_workers, use_flip
        self.train_split, self.val_split, self.shuffle_seed = train_split, val_split, shuffle_seed
        self.block_size, self.class_balance = block_size, check_class_balance(class_balance)
        for name, value in (("captions", captions), ("text_features", text_features)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        self.captions, self.text_features = captions, text_features
        #: the frozen encoder that computed the text features (a text VAR trained on them takes its weights)
        self.text_encoder_path = Path(root) / TEXT_ENCODER_FILE if text_features else None
        if text_features and not self.text_encoder_path.is_file():
            raise ValueError(f"text_features=true expects the encoder that computed them at {self.text_encoder_path} "
                             f"(varlib-tokenize data.captions=true text_encoder=...), found no such file")
        index = read_index(root)
        self.patch_nums = tuple(index["patch_nums"])
        self.num_classes = index["num_classes"]
        self.vocab_size = index["vocab_size"]
        self.has_val = val_split in index["splits"]
        names_path = Path(root) / CLASS_NAMES_FILE
        #: the classes' names (image folder names, emoji categories), or None when the cache has none
        self.class_names = json.loads(names_path.read_text()) if names_path.is_file() else None

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            text = dict(captions=self.captions, text_features=self.text_features)
            self.train_set = TokenDataset(self.root, self.train_split, self.use_flip, train=True, **text)
            self.val_set = TokenDataset(self.root, self.val_split, **text) if self.has_val else None

    def train_dataloader(self) -> DataLoader:
        if self.class_balance:
            sampler = ClassBalancedSampler(self.train_set.labels, self.class_balance, seed=self.shuffle_seed)
        else:
            sampler = RankBlockSampler(len(self.train_set), self.block_size, seed=self.shuffle_seed)
        return ResumableLoader(self.train_set, self.batch_size, sampler, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise ValueError(f"token cache {self.root} has no {self.val_split!r} split; set trainer.limit_val_batches=0")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
