"""Data layer: robust image loading, VAR's transforms, and Lightning DataModules.

- `EmojiDataModule`: embedded default dataset (Twemoji PNGs, 9 emoji-category classes), no download.
- `ImageFolderDataModule`: ImageNet / OpenImages style `root/{train,val}/<class>/*.jpg` or flat folders.
- `HFDataModule`: Hugging Face datasets (Hub ids, Parquet/Arrow/imagefolder/webdataset builders), streamed or not
  (`datasets` imported when one is built: `pip install "varlib[hf]"`).
- `WebDatasetDataModule`: tar shards (local, glob, brace, `pipe:`, fsspec URLs), local training shards read by index.

All yield batches `(images (B, 3, R, R) float32 in [-1, 1], labels (B,) int64)`, with `captions=True`
`(images, labels, captions (B str))` for text-to-image; unreadable (or, with captions, uncaptioned) samples are
skipped and counted in each DataModule's `skipped` property.
"""

from varlib.data.base import ImageDataModule
from varlib.data.emoji import EmojiDataModule
from varlib.data.folder import ImageFileDataset, ImageFolderDataModule
from varlib.data.decoding import ImageDecodeError, decode_rgb_image, load_rgb_image, to_rgb
from varlib.data.huggingface import HFDataModule
from varlib.data.shards import WebDatasetDataModule, resolve_shard_urls
from varlib.data.skipping import SkipCounter, collate_skipping_none
from varlib.data.transforms import ImageTransform, resize_target

__all__ = [
    "EmojiDataModule",
    "HFDataModule",
    "ImageDataModule",
    "ImageDecodeError",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageTransform",
    "SkipCounter",
    "WebDatasetDataModule",
    "collate_skipping_none",
    "decode_rgb_image",
    "load_rgb_image",
    "resize_target",
    "resolve_shard_urls",
    "to_rgb",
]
