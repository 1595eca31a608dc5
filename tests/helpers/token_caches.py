"""Token caches for tests: a few batches tokenised into one shard of a split."""

from __future__ import annotations

import os
from typing import Sequence

from varlib.data.base import Unit
from varlib.data.tokenizing import tokenize_split
from varlib.models.text import TextEncoder
from varlib.models.vqvae import MultiScaleVQVAE


def tokenize_to_cache(vae: MultiScaleVQVAE, batches, out_dir: str | os.PathLike, split: str, num_classes: int,
                      patch_nums: Sequence[int] | None = None, with_flip: bool = False, captions: bool = False,
                      text_encoder: TextEncoder | None = None) -> int:
    """Tokenises an iterable of ``(images, labels)`` batches (``(images, labels, captions)`` with ``captions``;
    e.g. a DataLoader) into one shard of ``split``; returns the number of images. For whole data sets use
    :func:`varlib.data.tokenizing.tokenize_split` (``varlib-tokenize``), whose arguments these are."""
    unit = Unit(0, lambda: batches, None, lambda: 0)
    pns = tuple(vae.patch_nums if patch_nums is None else patch_nums)
    return tokenize_split(vae, [unit], out_dir, split, num_classes, pns, with_flip=with_flip, captions=captions,
                          text_encoder=text_encoder)["written"]
