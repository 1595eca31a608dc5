"""A tokenizer metric: the share of the codebook that a whole split uses."""

from __future__ import annotations

import torch
from torchmetrics import Metric


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

