"""Validation helpers for tokenizer training: codebook usage over a whole split and reconstruction grids."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from varlib.images import image_grid as tile_images


class CodebookUsage(Metric):
    """Fraction of the V codes hit at least once by the tokens seen since the last reset.

    ``update(tokens)`` takes a LongTensor of any shape with values in [0, V); ``compute()`` returns a scalar
    in [0, 1]. The hit histogram is summed over processes, so the usage is that of the whole split.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, vocab_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.add_state("hits_V", default=torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens: torch.Tensor) -> None:
        tokens = tokens.flatten()
        if tokens.dtype != torch.long or (tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size)):
            raise ValueError(f"expected int64 tokens in [0, {self.vocab_size}), got {tokens.dtype} tokens")
        self.hits_V += torch.bincount(tokens, minlength=self.vocab_size)

    def compute(self) -> torch.Tensor:
        return (self.hits_V > 0).float().mean()


def image_grid(images_NCHW: torch.Tensor, num_columns: int, padding: int = 2) -> torch.Tensor:
    """Tiles N images (N,C,H,W) in [-1, 1] row by row on a white canvas -> (C, H', W') in [0, 1]."""
    unit_NCHW = images_NCHW.detach().float().clamp(-1, 1).add(1).div(2)
    return tile_images(unit_NCHW, columns=num_columns, padding=padding)
