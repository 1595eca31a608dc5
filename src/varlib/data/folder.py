"""Image-folder datasets (ImageNet / OpenImages layouts) that skip and count unreadable files.

Layouts under `root` (split folder names are configurable):

    root/train/<class>/**/*.jpg   root/val/<class>/**/*.jpg   class = subfolder, sorted -> index
    root/train/*.jpg              root/val/*.jpg              flat: one class, label 0

With captions (text-to-image), each image's caption comes from `captions.jsonl` at the split root, one JSON object
per line such as `{"file": "cat/001.jpg", "caption": "a grey cat asleep"}` (`file` relative to the split root,
the caption under `caption` or `text`), else from a `.txt` file beside the image with the same stem
(`cat/001.txt`). The class folder stays the label. An image with neither is skipped and counted like an unreadable
one (read lazily, so a missing `.txt` costs nothing at scan time).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from varlib.data.base import ImageDataModule
from varlib.data.decoding import ImageDecodeError, decode_rgb_image
from varlib.data.resumable import sample_generator
from varlib.data.skipping import SkipCounter
from varlib.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
FLAT_CLASS_NAME = "unlabelled"
CAPTIONS_FILE = "captions.jsonl"
CAPTION_KEYS = ("caption", "text")

Sample = tuple[str, int]


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_files(directory: Path, recursive: bool) -> list[str]:
    """Sorted paths of image files in `directory` (and its subfolders when `recursive`)."""
    if not recursive:
        entries = os.scandir(directory)
        return sorted(str(directory / e.name) for e in entries if e.is_file() and _is_image_file(e.name))
    found = []
    for current, subdirs, files in os.walk(directory, followlinks=True):
        subdirs.sort()
        found.extend(os.path.join(current, name) for name in sorted(files) if _is_image_file(name))
    return found


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) subfolders of `split_dir`; empty for a flat layout."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split not found: expected a directory at {split_dir}")
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def scan_split(split_dir: Path, class_names: list[str]) -> list[Sample]:
    """List `(path, label)` pairs of one split, labels indexing `class_names`.

    A flat split (no subfolders) must be scanned with `class_names == [FLAT_CLASS_NAME]`; a split
    with class subfolders may lack some classes but must not have folders outside `class_names`.
    Raises FileNotFoundError for a missing split and ValueError for a layout mismatch or no images.
    """
    folders = class_folders(split_dir)
    flat = class_names == [FLAT_CLASS_NAME]
    if flat and folders:
        raise ValueError(f"{split_dir}: expected a flat folder like the train split, got subfolders {folders[:5]}")
    if not flat and not folders:
        raise ValueError(f"{split_dir}: expected class subfolders {class_names[:5]}..., got a flat folder")
    unknown = sorted(set(folders) - set(class_names))
    if unknown:
        raise ValueError(f"{split_dir}: class folders {unknown[:5]} not among the {len(class_names)} train classes")

    if flat:
        samples = [(path, 0) for path in list_image_files(split_dir, recursive=False)]
    else:
        if list_image_files(split_dir, recursive=False):
            logger.warning("%s: image files next to the class folders are ignored", split_dir)
        samples = []
        present = set(folders)
        for label, name in enumerate(tqdm(class_names, desc=f"scanning {split_dir.name}", leave=False)):
            if name in present:
                samples.extend((path, label) for path in list_image_files(split_dir / name, recursive=True))
    if not samples:
        raise ValueError(f"{split_dir}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return samples


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """`{file: caption}` from a `captions.jsonl`: one JSON object per line with the image's path relative to the
    split root under `file` (POSIX separators) and its caption under `caption` or `text`; blank lines are ignored.

    Raises ValueError naming the file and line for a line that is not such an object, or a file listed twice.
    """
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: expected a JSON object, got {line.strip()[:80]!r} "
                                 f"({error.msg})") from None
            key = next((key for key in CAPTION_KEYS if isinstance(entry, dict) and key in entry), None)
            if key is None or not isinstance(entry.get("file"), str) or not isinstance(entry[key], str):
                raise ValueError(f"{path} line {number}: expected an object with a 'file' string and a 'caption' "
                                 f"(or 'text') string, got {line.strip()[:80]!r}")
            if entry["file"] in captions:
                raise ValueError(f"{path} line {number}: {entry['file']!r} is captioned a second time")
            captions[entry["file"]] = entry[key]
    return captions


class MissingCaptionError(ValueError):
    """An image of a captioned split has no caption that can be read."""


class FolderCaptions:
    """The captions of one split's images: `captions.jsonl` at the split root (:func:`read_captions_jsonl`, read
    once), else the `.txt` file beside the image with the same stem (read when asked, stripped of surrounding
    white space).

    Calling it with an image path returns the caption; raises `MissingCaptionError` for an image with neither.
    """

    def __init__(self, split_dir: Path) -> None:
        self.split_dir = split_dir
        jsonl = split_dir / CAPTIONS_FILE
        self.listed = read_captions_jsonl(jsonl) if jsonl.is_file() else {}

    def __call__(self, path: str) -> str:
        relative = Path(os.path.relpath(path, self.split_dir)).as_posix()
        if relative in self.listed:
            return self.listed[relative]
        text_path = Path(path).with_suffix(".txt")
        try:
            return text_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise MissingCaptionError(f"no caption: expected an entry for {relative!r} in "
                                      f"{self.split_dir / CAPTIONS_FILE} or a file {text_path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise MissingCaptionError(f"caption file {text_path} cannot be read as UTF-8 text "
                                      f"({type(error).__name__}: {error})") from None


class ImageFileDataset(Dataset):
    """Map-style dataset over image files; item i -> `(image (3, R, R) in [-1, 1], label () int64)`, with its
    caption (str) appended when `captions` is given.

    `transform` is called as `transform(image, generator)`, the generator seeded for the item by a
    `SeededIndex` (training sampler), else None. An unreadable file, or an image `captions` has no caption for,
    yields None (counted in `skip_counter` and logged); pair the DataLoader with `collate_skipping_none`.
    """

    def __init__(
        self, samples: list[Sample], transform: Callable, skip_counter: SkipCounter | None = None,
        captions: FolderCaptions | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter()
        self.captions = captions

    @property
    def skipped(self) -> int:
        return self.skip_counter.value

    @property
    def labels(self) -> torch.Tensor:
        """The label of each item, int64 (len(self),)."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple | None:
        path, label = self.samples[index]
        try:
            caption = None if self.captions is None else self.captions(path)
            image = decode_rgb_image(path)
        except (MissingCaptionError, ImageDecodeError) as error:
            self.skip_counter.record(f"image file {path}", str(error))
            return None
        item = self.transform(image, sample_generator(index)), torch.tensor(label, dtype=torch.int64)
        return item if caption is None else (*item, caption)


class ImageFolderDataModule(ImageDataModule):
    """LightningDataModule over `root/<train_dir>` and `root/<val_dir>` image folders.

    Args:
        root: dataset root directory.
        batch_size, num_workers: DataLoader settings (train batches drop the last partial batch).
        image_size: output resolution R of the official VAR transform.
        hflip: random horizontal flips for training.
        shuffle_seed: seeds the training order and augmentation (with the epoch and index).
        class_balance: in [0, 1]; > 0 draws training images class-balanced, 1.0 every class equally often.
        train_dir, val_dir: split folder names under `root`.
        captions: items are `(image, label, caption)` (text-to-image), captioned by each split's `captions.jsonl`
            or the images' `.txt` files (module docstring); the class folder stays the label. Images without a
            caption are skipped and counted.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 8,
        image_size: int = 256,
        hflip: bool = False,
        train_dir: str = "train",
        val_dir: str = "val",
        shuffle_seed: int = 0,
        class_balance: float = 0.0,
        captions: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, hflip, shuffle_seed, class_balance)
        if not isinstance(captions, bool):
            raise ValueError(f"captions must be a bool, got {captions!r}")
        self.captions = captions
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root not found: expected a directory at {self.root}")
        self.train_split = self.root / train_dir
        self.val_split = self.root / val_dir
        self._class_names: list[str] | None = None
        self.train_set: ImageFileDataset | None = None
        self.val_set: ImageFileDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names of the train split, or [FLAT_CLASS_NAME] for a flat layout."""
        if self._class_names is None:
            self._class_names = class_folders(self.train_split) or [FLAT_CLASS_NAME]
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ImageFileDataset(
                scan_split(self.train_split, self.class_names),
                ImageTransform(self.image_size, train=True, hflip=self.hflip),
                self.skip_counters["train"],
                FolderCaptions(self.train_split) if self.captions else None,
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = ImageFileDataset(
                scan_split(self.val_split, self.class_names),
                ImageTransform(self.image_size, train=False),
                self.skip_counters["val"],
                FolderCaptions(self.val_split) if self.captions else None,
            )
