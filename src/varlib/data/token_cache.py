"""Token cache: datasets pre-tokenised into multi-scale token maps, so VAR trains without the encoder.

Layout of a cache directory::

    index.json                 {"format", "patch_nums", "vocab_size", "num_classes", "splits": {split: [shard files]}}
    {split}-{i:05d}.safetensors  tokens (N, L) int16/int32, labels (N,) int64 [, tokens_flip (N, L)]

Each row holds the K token maps of one image concatenated in scale order (the first pn_0^2 entries are
scale 0, ...). With ``with_flip`` the horizontally flipped twin is stored too, and training picks one of
the two at random per sample (the official augmentation-free recipe corresponds to ``with_flip=False``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from varlib.data.samplers import ClassBalancedEpochSampler, EpochShuffleSampler
from varlib.models.vqvae import MultiScaleVQVAE

FORMAT = "varlib-token-cache/1"


@torch.no_grad()
def tokenize_to_cache(
    vae: MultiScaleVQVAE,
    loader: DataLoader,
    out_dir: str | os.PathLike,
    split: str,
    num_classes: int,
    patch_nums: Sequence[int] | None = None,
    with_flip: bool = False,
    shard_size: int = 50_000,
) -> int:
    """Tokenises every ``(img, label)`` batch of ``loader`` into shards under ``out_dir``; returns the count.

    Batches that the loader's collate dropped entirely (``None``) are skipped.
    """
    pns = tuple(vae.patch_nums if patch_nums is None else patch_nums)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.int16 if vae.vocab_size <= 2**15 else torch.int32
    device = next(vae.parameters()).device
    files, buffer, total = [], {"tokens": [], "labels": [], "tokens_flip": []}, 0

    def flush():
        if not buffer["labels"]:
            return
        name = f"{split}-{len(files):05d}.safetensors"
        shard = {k: torch.cat(v) for k, v in buffer.items() if v}
        save_file(shard, str(out / name))
        files.append(name)
        for v in buffer.values():
            v.clear()

    for batch in tqdm(loader, desc=f"tokenising {split}"):
        if batch is None:
            continue
        img, labels = batch
        img = img.to(device)
        buffer["tokens"].append(torch.cat(vae.encode_tokens(img, pns), dim=1).to(dtype).cpu())
        if with_flip:
            buffer["tokens_flip"].append(torch.cat(vae.encode_tokens(img.flip(-1), pns), dim=1).to(dtype).cpu())
        buffer["labels"].append(labels.long().cpu())
        total += labels.shape[0]
        if sum(t.shape[0] for t in buffer["labels"]) >= shard_size:
            flush()
    flush()
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"splits": {}}
    index.update(format=FORMAT, patch_nums=list(pns), vocab_size=vae.vocab_size, num_classes=num_classes)
    index["splits"][split] = files
    index_path.write_text(json.dumps(index, indent=1))
    return total


class TokenDataset(Dataset):
    """Rows of a cache split: ``(tokens (L,) int64, label)``; with flips, a random twin in training."""

    def __init__(self, root: str | os.PathLike, split: str, use_flip: bool = False):
        root = Path(root)
        index = read_index(root)
        if split not in index["splits"]:
            raise ValueError(f"token cache {root} has no split {split!r}; it has {sorted(index['splits'])}")
        shards = [load_file(str(root / name)) for name in index["splits"][split]]
        if not shards:
            raise ValueError(f"token cache {root} split {split!r} is empty")
        self.tokens = torch.cat([s["tokens"] for s in shards])
        self.labels = torch.cat([s["labels"] for s in shards])
        has_flip = all("tokens_flip" in s for s in shards)
        if use_flip and not has_flip:
            raise ValueError(f"token cache {root} split {split!r} was written without flipped twins (with_flip)")
        self.flipped = torch.cat([s["tokens_flip"] for s in shards]) if use_flip else None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        tokens = self.tokens[i]
        if self.flipped is not None and torch.rand(()) < 0.5:
            tokens = self.flipped[i]
        return tokens.long(), self.labels[i]


def read_index(root: str | os.PathLike) -> dict:
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no token cache at {root}: expected {path} (write one with varlib-tokenize)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a varlib token cache (format {index.get('format')!r}, expected {FORMAT!r})")
    return index


class TokenCacheDataModule(L.LightningDataModule):
    """Batches ``(tokens (B, L) int64, labels (B,))`` from a token cache written by ``varlib-tokenize``.

    The training order depends only on ``shuffle_seed`` and the epoch, so a resumed run replays it exactly.
    ``class_balance`` > 0 draws training items with replacement, class c with weight count(c) ** -class_balance
    (``ClassBalancedEpochSampler``; 1: every class equally often).
    """

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 0, use_flip: bool = False,
                 train_split: str = "train", val_split: str = "val", shuffle_seed: int = 0,
                 class_balance: float = 0.0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root, self.batch_size, self.num_workers, self.use_flip = root, batch_size, num_workers, use_flip
        self.train_split, self.val_split, self.shuffle_seed = train_split, val_split, shuffle_seed
        if isinstance(class_balance, bool) or not 0.0 <= class_balance <= 1.0:
            raise ValueError(f"class_balance must be a number in [0, 1], got {class_balance!r}")
        self.class_balance = class_balance
        index = read_index(root)
        self.patch_nums = tuple(index["patch_nums"])
        self.num_classes = index["num_classes"]
        self.vocab_size = index["vocab_size"]
        self.has_val = val_split in index["splits"]

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = TokenDataset(self.root, self.train_split, self.use_flip)
            self.val_set = TokenDataset(self.root, self.val_split) if self.has_val else None

    def train_dataloader(self) -> DataLoader:
        if self.class_balance > 0:
            sampler = ClassBalancedEpochSampler(self.train_set.labels, self.class_balance, self.shuffle_seed)
        else:
            sampler = EpochShuffleSampler(len(self.train_set), self.shuffle_seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise ValueError(f"token cache {self.root} has no {self.val_split!r} split; set trainer.limit_val_batches=0")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
