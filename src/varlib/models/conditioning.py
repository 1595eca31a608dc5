"""What a VAR is conditioned on: class labels or text, as a swappable module the transformer holds.

A conditioning turns what the user gives (labels, prompts) into a prepared batch (:meth:`Conditioning.prepare`),
drops rows to its null condition for classifier-free guidance training (:meth:`Conditioning.drop`), gives the
unconditional half of guided sampling (:meth:`Conditioning.unconditional`, a negative prompt or the null), and maps
a prepared batch to the (B,D) vector that is both the start token and the AdaLN condition (``forward``) and to the
token features the blocks' cross-attention reads (:meth:`Conditioning.context`, None without cross-attention).

- :class:`ClassConditioning`: the official class embedding (num_classes + 1 rows, the last the null class). It is
  registered as ``class_emb``, so class-conditional state dicts keep the official keys.
- :class:`TextConditioning`: a text encoder's pooled feature through a linear projection (replacing the class
  embedding), its token features as cross-attention context, and a learned null text. Registered as ``text_cond``.

A VAR's config records its conditioning (:attr:`Conditioning.spec`); :func:`build_conditioning` rebuilds it.
Shapes: B batch, D condition width (= the transformer's width C), Dt text feature width, T text tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from varlib.models.sampling import as_labels
from varlib.models.text import TextEncoder, TextFeatures, build_text_encoder, drop_words


class Conditioning(nn.Module):
    """The interface of a VAR's conditioning (see the module docstring). ``ATTRIBUTE``: the name the transformer
    registers it under; ``num_classes``: real classes (0 for text); ``context_dim``: the width of the token features
    for cross-attention (None: no cross-attention)."""

    ATTRIBUTE: ClassVar[str]
    #: what ``generate`` takes, for model cards' usage lines
    EXAMPLE: ClassVar[str]
    num_classes: int = 0
    context_dim: int | None = None

    def prepare(self, condition: Any, batch_size: int | None, model) -> Any:
        """The validated batch on ``model``'s device; ``batch_size`` repeats a single condition."""
        raise NotImplementedError

    def batch_size(self, prepared: Any) -> int:
        return len(prepared)

    def drop(self, prepared: Any, rate: float) -> Any:
        """Each row becomes the null condition with probability ``rate`` (training)."""
        raise NotImplementedError

    def unconditional(self, prepared: Any, negative: Any | None = None) -> Any:
        """The unconditional half of guided sampling for ``prepared``: ``negative`` (prepared; one row or one per
        row) when given, else the null condition."""
        raise NotImplementedError

    def cat(self, first: Any, second: Any) -> Any:
        """The rows of both prepared batches."""
        raise NotImplementedError

    def context(self, prepared: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cross-attention context: (tokens (B,T,Dt), mask (B,T) bool), or None."""
        return None

    @property
    def spec(self) -> dict:
        """What a model config records to rebuild this conditioning (:func:`build_conditioning`)."""
        raise NotImplementedError

    def describe(self) -> tuple[str, str]:
        """(kind, what it is conditioned on) for model cards: ("class-conditional", "9 classes")."""
        raise NotImplementedError


def _check_rows(batch_size: int, count: int) -> None:
    if count not in (1, batch_size):
        raise ValueError(f"expected 1 or {batch_size} negative conditions, got {count}")


class ClassConditioning(Conditioning, nn.Embedding):
    """Class labels: the (num_classes + 1, D) class embedding, row ``num_classes`` the null class. Prepared
    batches are (B,) int64 labels."""

    ATTRIBUTE, EXAMPLE = "class_emb", "[0, 1]"

    def __init__(self, num_classes: int, width: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(num_classes + 1, width)
        self.num_classes = num_classes

    def prepare(self, condition: Any, batch_size: int | None, model) -> torch.Tensor:
        return as_labels(model, condition, batch_size)

    def drop(self, labels_B: torch.Tensor, rate: float) -> torch.Tensor:
        drop = torch.rand(labels_B.shape[0], device=labels_B.device) < rate
        return torch.where(drop, self.num_classes, labels_B)

    def unconditional(self, labels_B: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        if negative is None:
            return labels_B.new_full(labels_B.shape, self.num_classes)
        _check_rows(len(labels_B), len(negative))
        return negative.expand(len(labels_B))

    def cat(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat((first, second))

    @property
    def spec(self) -> dict:
        return dict(type="class")

    def describe(self) -> tuple[str, str]:
        return "class-conditional", f"{self.num_classes} classes"


class TextConditioning(Conditioning):
    """Text prompts: the pooled text feature through ``pooled_proj`` (Dt -> D) is the start token and the AdaLN
    condition; the token features are the cross-attention context; a learned null text (``null_pooled_D`` and one
    null token ``null_tokens_1D``) stands for "no prompt" in conditional dropout and guidance.

    Prepared batches are :class:`~varlib.models.text.TextFeatures`; prompts (a str, a list of str) are encoded by
    ``encoder``, already encoded features are taken as they are.

    Args:
        encoder: a :class:`~varlib.models.text.TextEncoder`, or its ``config`` (``_target_`` and arguments).
        width: D, the transformer's width.
        cross_attention: feed the token features to a cross-attention in each block (False: the pooled feature
            only, as VAR-CLIP).
        word_dropout: in training mode, each word of a prompt given as text is left out with this probability (at
            least one kept; :func:`~varlib.models.text.drop_words`), so that a word learns what it means alone and
            not only as part of one caption ("red" from "red heart", "red apple", ...). Sampling keeps every word.
    """

    ATTRIBUTE, EXAMPLE = "text_cond", '["red heart", "cat face"]'

    def __init__(self, encoder: TextEncoder | Mapping, width: int, cross_attention: bool = True,
                 word_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"word_dropout must lie in [0, 1), got {word_dropout}")
        self.word_dropout = word_dropout
        self.encoder = encoder if isinstance(encoder, TextEncoder) else build_text_encoder(encoder)
        dim = self.encoder.dim
        self.pooled_proj = nn.Linear(dim, width)
        self.null_pooled_D = nn.Parameter(torch.empty(dim))
        self.null_tokens_1D = nn.Parameter(torch.empty(1, dim))
        for p in (self.null_pooled_D, self.null_tokens_1D):
            nn.init.trunc_normal_(p, std=0.02)
        self.context_dim = dim if cross_attention else None

    def prepare(self, condition: Any, batch_size: int | None, model) -> TextFeatures:
        if isinstance(condition, str):
            condition = [condition] * (batch_size or 1)
        if isinstance(condition, TextFeatures):
            features = condition
        elif isinstance(condition, (list, tuple)) and condition and all(isinstance(p, str) for p in condition):
            if self.training and self.word_dropout > 0:
                condition = drop_words(condition, self.word_dropout)
            features = self.encoder.encode(condition)
        else:
            raise ValueError(f"a text model takes prompts (a str or a non-empty list of str) or TextFeatures, "
                             f"got {type(condition).__name__}: {str(condition)[:80]}")
        device = self.pooled_proj.weight.device
        return TextFeatures(features.tokens_BTD.to(device), features.mask_BT.to(device), features.pooled_BD.to(device))

    def null(self, batch_size: int) -> TextFeatures:
        """The null text for ``batch_size`` rows: one null token, the null pooled feature."""
        tokens_B1D = self.null_tokens_1D.unsqueeze(0).expand(batch_size, -1, -1)
        mask_B1 = torch.ones(batch_size, 1, dtype=torch.bool, device=tokens_B1D.device)
        return TextFeatures(tokens_B1D, mask_B1, self.null_pooled_D.expand(batch_size, -1))

    def drop(self, features: TextFeatures, rate: float) -> TextFeatures:
        drop = torch.rand(len(features), device=features.pooled_BD.device) < rate
        return TextFeatures.where(drop, self.null(len(features)), features)

    def unconditional(self, features: TextFeatures, negative: TextFeatures | None = None) -> TextFeatures:
        if negative is None:
            return self.null(len(features))
        _check_rows(len(features), len(negative))
        return negative.expand(len(features))

    def cat(self, first: TextFeatures, second: TextFeatures) -> TextFeatures:
        return TextFeatures.cat([first, second])

    def forward(self, features: TextFeatures) -> torch.Tensor:
        """(B,D) condition from the (B,Dt) pooled features."""
        return self.pooled_proj(features.pooled_BD.to(self.pooled_proj.weight.dtype))

    def context(self, features: TextFeatures) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.context_dim is None:
            return None
        return features.tokens_BTD, features.mask_BT

    @property
    def spec(self) -> dict:
        return dict(type="text", encoder=self.encoder.config, cross_attention=self.context_dim is not None,
                    word_dropout=self.word_dropout)

    def describe(self) -> tuple[str, str]:
        return "text-conditional", f"text encoder {type(self.encoder).__name__} ({self.encoder.dim}-wide features)"


def build_conditioning(spec: Mapping | None, num_classes: int, width: int) -> Conditioning:
    """The conditioning a config records: None or ``{"type": "class"}`` (``num_classes`` classes), or
    ``{"type": "text", "encoder": <encoder or its config>, "cross_attention": bool}``; D = ``width``."""
    values = dict(spec or {"type": "class"})
    kind = values.pop("type", None)
    if kind == "class" and not values:
        return ClassConditioning(num_classes, width)
    if kind == "text":
        return TextConditioning(width=width, **values)
    raise ValueError(f"conditioning must be {{'type': 'class'}} or {{'type': 'text', 'encoder': ..., "
                     f"'cross_attention': ...}}, got {dict(spec)}")

