"""Text encoders for text-conditional VAR: token features, a padding mask and a pooled feature per prompt.

Two kinds, both :class:`TextEncoder`:

- :class:`HFTextEncoder`: a frozen Hugging Face ``transformers`` text model (a CLIP text model, a T5 encoder),
  from a Hub name or from a config (randomly initialised: tests, or weights that come from a VAR file). Needs the
  optional ``transformers`` package (``pip install 'varlib[text]'``).
- :class:`SmallTextEncoder`: a small trainable transformer over words (:class:`WordTokenizer`, hashed: no vocabulary
  file) or UTF-8 bytes (:class:`ByteTokenizer`), for when no pretrained encoder is at hand.

An encoder's ``config`` holds its ``_target_`` and constructor arguments; :func:`build_text_encoder` rebuilds it
(a VAR file records it under its conditioning).

Shapes: B prompts, T tokens (padded to the longest prompt), D feature width.
"""

from __future__ import annotations

import copy
import importlib
import re
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TextFeatures:
    """An encoded batch of prompts.

    tokens_BTD: (B,T,D) token features; mask_BT: (B,T) bool, True at real tokens (every row has at least one);
    pooled_BD: (B,D) one feature per prompt.
    """

    tokens_BTD: torch.Tensor
    mask_BT: torch.Tensor
    pooled_BD: torch.Tensor

    def __len__(self) -> int:
        return self.pooled_BD.shape[0]

    def padded(self, length: int) -> "TextFeatures":
        """The same features padded with masked-out zero tokens to ``length`` tokens."""
        extra = length - self.tokens_BTD.shape[1]
        return TextFeatures(F.pad(self.tokens_BTD, (0, 0, 0, extra)), F.pad(self.mask_BT, (0, extra)), self.pooled_BD)

    def expand(self, batch_size: int) -> "TextFeatures":
        """One prompt's features repeated to ``batch_size`` rows (a batch of that size is returned as it is)."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise ValueError(f"expected 1 or {batch_size} prompts, got {len(self)}")
        return TextFeatures(self.tokens_BTD.expand(batch_size, -1, -1), self.mask_BT.expand(batch_size, -1),
                            self.pooled_BD.expand(batch_size, -1))

    @staticmethod
    def cat(parts: Sequence["TextFeatures"]) -> "TextFeatures":
        """Rows of all ``parts``, padded to the longest."""
        length = max(p.tokens_BTD.shape[1] for p in parts)
        padded = [p.padded(length) for p in parts]
        fields = ("tokens_BTD", "mask_BT", "pooled_BD")
        return TextFeatures(*(torch.cat([getattr(p, f) for p in padded]) for f in fields))

    @staticmethod
    def where(pick_B: torch.Tensor, a: "TextFeatures", b: "TextFeatures") -> "TextFeatures":
        """Row i of ``a`` where ``pick_B[i]``, else of ``b`` (padded to the longer of the two)."""
        length = max(a.tokens_BTD.shape[1], b.tokens_BTD.shape[1])
        a, b = a.padded(length), b.padded(length)
        return TextFeatures(torch.where(pick_B[:, None, None], a.tokens_BTD, b.tokens_BTD),
                            torch.where(pick_B[:, None], a.mask_BT, b.mask_BT),
                            torch.where(pick_B[:, None], a.pooled_BD, b.pooled_BD))


def masked_mean(tokens_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The mean of the real tokens of each row: (B,T,D), (B,T) -> (B,D)."""
    weights_BT1 = mask_BT.unsqueeze(-1).to(tokens_BTD.dtype)
    return (tokens_BTD * weights_BT1).sum(1) / weights_BT1.sum(1)


def drop_words(prompts: Sequence[str], rate: float) -> list[str]:
    """Each prompt with each of its space-separated words left out with probability ``rate`` (torch's random
    generator, so a seeded training step draws the same), keeping at least one word: the one drawn last to go."""
    kept_prompts = []
    for prompt in prompts:
        words = prompt.split()
        if len(words) < 2:
            kept_prompts.append(prompt)
            continue
        draws = torch.rand(len(words)).tolist()
        kept = [w for w, u in zip(words, draws) if u >= rate] or [words[max(range(len(words)), key=draws.__getitem__)]]
        kept_prompts.append(" ".join(kept))
    return kept_prompts


class ByteTokenizer:
    """Prompts as UTF-8 bytes: pad 0, byte b -> b + 1, then BOS 257 and EOS 258.

    EOS is the largest id, so a CLIP text model's legacy pooling (the position of the largest id) finds it.
    Each prompt becomes BOS, its bytes (cut to ``max_length`` - 2) and EOS; rows are padded to the longest.
    """

    pad_id, bos_id, eos_id = 0, 257, 258
    vocab_size = 259

    def __init__(self, max_length: int = 64):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (BOS, a byte, EOS), got {max_length}")
        self.max_length = max_length

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B,T) int64, mask (B,T) bool)."""
        rows = [[self.bos_id, *(b + 1 for b in p.encode()[: self.max_length - 2]), self.eos_id] for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows], dtype=torch.long)
        return ids, ids != self.pad_id


class WordTokenizer:
    """Prompts as lower-case words, each hashed (CRC-32) to one of ``buckets`` ids: pad 0, BOS 1, EOS 2, word w ->
    3 + crc32(w) mod ``buckets``.

    No vocabulary to build or ship, and a word never seen in training still gets a stable id. Words are runs of
    letters and digits of any script ("piñata", "猫"); each prompt becomes BOS, its words (cut to ``max_length`` - 2)
    and EOS; rows are padded to the longest.
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    WORD = re.compile(r"[^\W_]+")

    def __init__(self, buckets: int = 4096, max_length: int = 32):
        if buckets < 1 or max_length < 3:
            raise ValueError(f"WordTokenizer needs buckets >= 1 and max_length >= 3 (BOS, a word, EOS), got "
                             f"buckets={buckets}, max_length={max_length}")
        self.buckets, self.max_length = buckets, max_length
        self.vocab_size = buckets + 3

    @classmethod
    def words(cls, prompt: str) -> list[str]:
        """The lower-case words of ``prompt``, in order."""
        return cls.WORD.findall(prompt.lower())

    def word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode()) % self.buckets

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B,T) int64, mask (B,T) bool)."""
        rows = [[self.bos_id, *(self.word_id(w) for w in self.words(p)[: self.max_length - 2]), self.eos_id]
                for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows], dtype=torch.long)
        return ids, ids != self.pad_id


class TextEncoder(nn.Module):
    """What text conditioning needs of an encoder: ``dim`` (D), ``frozen`` (no training, no gradients),
    ``config`` (``_target_`` and constructor arguments) and :meth:`encode`."""

    dim: int
    frozen: bool
    config: dict

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B,T) int64, mask (B,T) bool) on the CPU."""
        raise NotImplementedError

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> TextFeatures:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Tokenises and encodes ``prompts`` on the encoder's device (without gradients when frozen)."""
        device = next(self.parameters()).device
        ids_BT, mask_BT = (t.to(device) for t in self.tokenize(list(prompts)))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self(ids_BT, mask_BT)


#: Hugging Face model types whose encoder class is not what AutoModel builds (T5: the encoder without decoder)
HF_ENCODER_CLASSES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel",
                      "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _transformers() -> Any:
    try:
        import transformers  # optional dependency (varlib[text])
    except ImportError:
        raise ImportError("HFTextEncoder needs the transformers package: pip install 'varlib[text]'") from None
    return transformers


class HFTextEncoder(TextEncoder):
    """A frozen Hugging Face text encoder: token features are its last hidden states, the pooled feature its
    ``pooler_output`` when it has one (CLIP: the EOS token's feature) and the mean of the real tokens otherwise (T5).

    Args:
        name: a Hub model name (``openai/clip-vit-large-patch14``, ``google/flan-t5-base``); with no ``config``
            its pretrained weights are loaded. Its tokenizer is loaded by this name.
        config: a ``transformers`` config (or its ``to_dict()``) to build a randomly initialised model from (the
            weights then come from a VAR file, or tests use it as it is); no download.
        max_length: the longest tokenised prompt.

    Without a ``name`` nothing names a tokenizer, so prompts are tokenised by :class:`ByteTokenizer` (the model's
    vocabulary must hold its 259 ids, and the model's config gets its pad, BOS and EOS ids, which CLIP's pooling
    looks for); nothing is downloaded then.
    """

    frozen = True

    def __init__(self, name: str | None = None, config: Mapping | Any | None = None, max_length: int = 77):
        super().__init__()
        if name is None and config is None:
            raise ValueError("HFTextEncoder needs a Hub model name or a transformers config")
        transformers = _transformers()
        if config is None:
            hf_config = transformers.AutoConfig.from_pretrained(name)
        elif isinstance(config, Mapping):
            values = dict(config)
            hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
        else:
            hf_config = config
        if name is None:
            if hf_config.vocab_size < ByteTokenizer.vocab_size:
                raise ValueError(f"the byte tokenizer needs a vocabulary of {ByteTokenizer.vocab_size} ids, the "
                                 f"model has {hf_config.vocab_size}")
            hf_config = copy.deepcopy(hf_config)
            hf_config.update(dict(pad_token_id=ByteTokenizer.pad_id, bos_token_id=ByteTokenizer.bos_id,
                                  eos_token_id=ByteTokenizer.eos_id))
        model_class = getattr(transformers, HF_ENCODER_CLASSES.get(hf_config.model_type, "AutoModel"))
        if config is None:
            self.model = model_class.from_pretrained(name)
        elif model_class is transformers.AutoModel:
            self.model = model_class.from_config(hf_config)
        else:
            self.model = model_class(hf_config)
        self.model.requires_grad_(False).eval()
        self.dim = self.model.config.hidden_size
        if name is None:
            self._tokenizer = ByteTokenizer(min(max_length, getattr(self.model.config, "max_position_embeddings",
                                                                    max_length)))
        else:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        self.max_length = max_length
        self.config = dict(_target_=f"{__name__}.HFTextEncoder", name=name, config=self.model.config.to_dict(),
                           max_length=max_length)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever mode the VAR trains in
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self._tokenizer, ByteTokenizer):
            return self._tokenizer(prompts)
        batch = self._tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> TextFeatures:
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT.long())
        tokens_BTD = out.last_hidden_state
        pooled_BD = getattr(out, "pooler_output", None)
        if pooled_BD is None:
            pooled_BD = masked_mean(tokens_BTD, mask_BT)
        return TextFeatures(tokens_BTD, mask_BT, pooled_BD)


class SmallTextEncoder(TextEncoder):
    """A small trainable text encoder: token embeddings plus learned positions, ``depth`` pre-norm transformer
    layers with padding masked, a final LayerNorm; the token features are the layers' outputs.

    Args:
        width: D. depth, num_heads, mlp_ratio: the layers. max_length: the longest tokenised prompt.
        tokens: ``"words"`` (:class:`WordTokenizer`, ``buckets`` hashed ids) or ``"bytes"``
            (:class:`ByteTokenizer`). Words learn from few captions: a word's meaning is one embedding row, where
            bytes must first be composed into words by the layers.
        pool: the pooled feature. ``"features"``: the mean of the real tokens' features. ``"words"``: a bag of
            words, the LayerNorm'd mean of the embeddings of the prompt's words (BOS and EOS left out), so that each
            word moves it by its own row ("red" alike in "red heart" and "red apple") rather than through layers that
            first learn the frequent words naming categories. ``"features+words"``: the sum of the two.
    """

    frozen = False
    POOLS = ("features", "words", "features+words")

    def __init__(self, width: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
                 max_length: int = 64, tokens: str = "bytes", buckets: int = 4096, pool: str = "features"):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"SmallTextEncoder pool must be one of {list(self.POOLS)}, got {pool!r}")
        if tokens == "words":
            self._tokenizer = WordTokenizer(buckets, max_length)
        elif tokens == "bytes":
            self._tokenizer = ByteTokenizer(max_length)
        else:
            raise ValueError(f"SmallTextEncoder tokens must be 'words' or 'bytes', got {tokens!r}")
        self.dim = width
        self.token_embed = nn.Embedding(self._tokenizer.vocab_size, width)
        # Small rows (GPT-2's 0.02): a word never trained on, or its hash bucket, barely moves a prompt's features.
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        self.pos_1TD = nn.Parameter(torch.empty(1, max_length, width))
        nn.init.trunc_normal_(self.pos_1TD, std=0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, round(width * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = pool
        self.pool_norm = nn.LayerNorm(width) if pool != "features" else None
        self.config = dict(_target_=f"{__name__}.SmallTextEncoder", width=width, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, max_length=max_length, tokens=tokens, buckets=buckets, pool=pool)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tokenizer(prompts)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> TextFeatures:
        embed_BTD = self.token_embed(ids_BT)
        x_BTD = embed_BTD + self.pos_1TD[:, : ids_BT.shape[1]]
        tokens_BTD = self.norm(self.layers(x_BTD, src_key_padding_mask=~mask_BT))
        if self.pool == "features":
            pooled_BD = masked_mean(tokens_BTD, mask_BT)
        elif self.pool == "words":
            pooled_BD = self.bag_of_words(ids_BT, mask_BT, embed_BTD)
        else:
            pooled_BD = masked_mean(tokens_BTD, mask_BT) + self.bag_of_words(ids_BT, mask_BT, embed_BTD)
        return TextFeatures(tokens_BTD, mask_BT, pooled_BD)

    def bag_of_words(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, embed_BTD: torch.Tensor) -> torch.Tensor:
        """(B,D): the LayerNorm'd mean of the embeddings of each prompt's words (BOS and EOS for the empty one)."""
        words_BT = mask_BT & (ids_BT != self._tokenizer.bos_id) & (ids_BT != self._tokenizer.eos_id)
        words_BT = torch.where(words_BT.any(1, keepdim=True), words_BT, mask_BT)
        return self.pool_norm(masked_mean(embed_BTD, words_BT))


def build_text_encoder(config: Mapping) -> TextEncoder:
    """The encoder an encoder ``config`` describes (``_target_``: a :class:`TextEncoder` class, plus its
    arguments). Only TextEncoder classes are built: a model file's config never calls anything else."""
    values = dict(config)
    target = values.pop("_target_", None)
    module_name, _, class_name = (target or "").rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
    if not (isinstance(cls, type) and issubclass(cls, TextEncoder)):
        raise ValueError(f"a text encoder config needs a _target_ naming a TextEncoder class "
                         f"(e.g. {__name__}.SmallTextEncoder), got {target!r}")
    return cls(**values)
