"""Writing a token cache (``varlib.data.token_cache``) at ImageNet scale: in shards, on several processes, resumable.

A split is cut into *units* that each become one shard file: ``shard_size`` consecutive images of a map-style
dataset, or one tar file of a WebDataset. Process ``rank`` of ``world_size`` tokenises units rank, rank +
world_size, ... (``torchrun`` sets RANK and WORLD_SIZE; no process group is needed). A shard is written to a
temporary name and renamed when complete, so a killed run leaves only finished shards, and a re-run skips them.
Each unit's random draws (``crops > 1``) are seeded with ``seed + unit``, so a resumed run writes the same bytes
as an uninterrupted one. Whichever process finds every unit of a split finished writes ``index.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from tqdm.auto import tqdm

from varlib.configs import datamodule_config, instantiate_config
from varlib.data.base import ImageDataModule, Unit, check_int_at_least
from varlib.data.token_cache import CLASS_NAMES_FILE, FORMAT, TEXT_ENCODER_FILE, read_index
from varlib.data.transforms import ImageTransform, MultiCropTransform
from varlib.inference import inference_precision, rank_device, resolve_device, resolve_precision
from varlib.files.loading import load_tokenizer
from varlib.models.patch_schedules import validate_patch_nums
from varlib.models.text import TextEncoder, build_text_encoder
from varlib.models.vqvae import MultiScaleVQVAE

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")


def shard_name(split: str, unit: int) -> str:
    return f"{split}-{unit:05d}.safetensors"


def read_shard_metadata(path: Path) -> dict:
    """The run settings, unit and skip count a shard was written with."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {}).get("varlib", "{}"))


@torch.no_grad()
def _encode(vae: MultiScaleVQVAE, images: torch.Tensor, patch_nums: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """(B,[C,]3,R,R) images -> (B,[C,]L) tokens on the CPU."""
    flat = images.flatten(0, images.ndim - 4)
    tokens = torch.cat(vae.encode_tokens(flat, patch_nums), dim=1).to(dtype).cpu()
    return tokens.view(*images.shape[:-3], tokens.shape[-1])


def encode_captions(captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Captions as shard tensors: ``caption_bytes`` (their UTF-8 bytes concatenated, uint8) and ``caption_offsets``
    (N+1,) int64, caption i being bytes offsets[i]:offsets[i+1] (safetensors holds no strings)."""
    encoded = [caption.encode() for caption in captions]
    offsets = torch.tensor([0, *(len(b) for b in encoded)], dtype=torch.int64).cumsum(0)
    return {"caption_bytes": torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()),
            "caption_offsets": offsets}


@torch.no_grad()
def encode_text(encoder: TextEncoder, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """A frozen encoder's features of ``captions`` on the CPU, in fp32: ``text_tokens`` (B,T,D), ``text_mask``
    (B,T) uint8 (1 at real tokens), ``text_pooled`` (B,D)."""
    device = next(encoder.parameters()).device
    with torch.autocast(device_type=device.type, enabled=False):  # fp32, as a sampling model encodes prompts
        features = encoder.encode(list(captions))
    return {"text_tokens": features.tokens_BTD.float().cpu(), "text_mask": features.mask_BT.to(torch.uint8).cpu(),
            "text_pooled": features.pooled_BD.float().cpu()}


def _cat_padded(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Rows of ``parts`` (B_i, T_i, ...) padded with zeros to the longest T: a shard's text features."""
    if not parts:
        return empty
    length = max(part.shape[1] for part in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.ndim - 2) + (0, length - p.shape[1])) for p in parts])


def _write_unit(vae, unit: Unit, path: Path, patch_nums, with_flip: bool, seed: int, signature: dict,
                progress: tqdm, text_encoder: TextEncoder | None) -> tuple[int, int]:
    """Tokenises one unit into ``path`` (atomically); returns (images written, images skipped)."""
    device = next(vae.parameters()).device
    dtype = torch.int16 if vae.vocab_size <= 2**15 else torch.int32
    parts = {"tokens": [], "labels": [], "tokens_flip": []}
    captions, text = [], {"text_tokens": [], "text_mask": [], "text_pooled": []}
    skipped_before = unit.skip_count()
    torch.manual_seed(seed + unit.index)  # random crops (and DataLoader worker seeds) depend only on the unit
    for batch in unit.make_loader():
        if batch is None:
            continue
        if len(batch) != 2 + signature["captions"]:
            raise ValueError(f"expected batches of (images, labels{', captions' if signature['captions'] else ''}), "
                             f"got {len(batch)} entries")
        images, labels, *batch_captions = batch
        if batch_captions:
            captions.extend(batch_captions[0])
        if text_encoder is not None:
            for name, value in encode_text(text_encoder, batch_captions[0]).items():
                text[name].append(value)
        images = images.to(device)
        parts["tokens"].append(_encode(vae, images, patch_nums, dtype))
        if with_flip:
            parts["tokens_flip"].append(_encode(vae, images.flip(-1), patch_nums, dtype))
        parts["labels"].append(labels.long().cpu())
        progress.update(labels.shape[0])
    skipped = unit.skip_count() - skipped_before
    length, crops = sum(p * p for p in patch_nums), signature["crops"]
    empty = torch.zeros((0, length) if crops == 1 else (0, crops, length), dtype=dtype)
    shard = {"tokens": torch.cat(parts["tokens"]) if parts["tokens"] else empty,
             "labels": torch.cat(parts["labels"]) if parts["labels"] else torch.zeros(0, dtype=torch.long)}
    if with_flip:
        shard["tokens_flip"] = torch.cat(parts["tokens_flip"]) if parts["tokens_flip"] else empty
    if signature["captions"]:
        shard.update(encode_captions(captions))
    if text_encoder is not None:
        dim = text_encoder.dim
        shard.update(text_tokens=_cat_padded(text["text_tokens"], torch.zeros(0, 1, dim)),
                     text_mask=_cat_padded(text["text_mask"], torch.zeros(0, 1, dtype=torch.uint8)),
                     text_pooled=torch.cat(text["text_pooled"]) if text["text_pooled"] else torch.zeros(0, dim))
    # one metadata entry: safetensors writes several in no fixed order, and a resumed run must write the same bytes
    metadata = {"varlib": json.dumps({**signature, "unit": unit.index, "skipped": skipped}, sort_keys=True)}
    partial = path.with_name(path.name + ".partial")
    save_file(shard, str(partial), metadata=metadata)
    os.replace(partial, path)
    return shard["labels"].shape[0], skipped


def unfinished_units(out: Path, split: str, units: Sequence[Unit], signature: Mapping[str, Any]) -> list[Unit]:
    """The ``units`` whose shard in ``out`` is not written yet; raises ValueError for a finished shard written with
    another ``signature`` (schedule, tokenizer size, crops, ...)."""
    todo = []
    for unit in units:
        path = out / shard_name(split, unit.index)
        if not path.is_file():
            todo.append(unit)
            continue
        # shards written before captions existed have none
        metadata = {"captions": False, "text_encoder": None, **read_shard_metadata(path)}
        found = {k: v for k, v in metadata.items() if k in signature}
        if found != signature:
            raise ValueError(f"{path} was written by another tokenisation run ({found}); this run writes "
                             f"{signature}: choose another out_dir")
    return todo


def tokenize_split(
    vae: MultiScaleVQVAE,
    units: Sequence[Unit],
    out_dir: str | os.PathLike,
    split: str,
    num_classes: int,
    patch_nums: Sequence[int],
    with_flip: bool = False,
    crops: int = 1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    captions: bool = False,
    text_encoder: TextEncoder | None = None,
) -> dict[str, int]:
    """Tokenises this process's share of ``units`` into ``out_dir``; finished shards are kept, not redone.
    With ``captions`` the units' batches carry captions, which the shards keep (:func:`encode_captions`); a frozen
    ``text_encoder`` adds their features (:func:`encode_text`), so that training does not run it.

    Returns ``{"written", "skipped", "resumed"}`` for this process (``resumed``: finished shards found). Raises
    ValueError when ``out_dir`` holds shards written with other settings (schedule, tokenizer size, crops, ...).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank {rank} of {world_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if text_encoder is not None and not (captions and text_encoder.frozen):
        raise ValueError(f"precomputed text features need captions=True and a frozen text encoder (a trainable one "
                         f"encodes the captions at each step), got captions={captions} and "
                         f"{type(text_encoder).__name__} (frozen={text_encoder.frozen})")
    signature = {"format": FORMAT, "split": split, "units": len(units), "patch_nums": list(patch_nums),
                 "vocab_size": vae.vocab_size, "num_classes": num_classes, "with_flip": with_flip, "crops": crops,
                 "seed": seed, "captions": captions,
                 # as the metadata's JSON reads back (a Hugging Face config has int dict keys)
                 "text_encoder": None if text_encoder is None else json.loads(json.dumps(text_encoder.config))}
    mine = [unit for unit in units if unit.index % world_size == rank]
    todo = unfinished_units(out, split, mine, signature)
    known = [u.size for u in todo]
    total = sum(known) if all(s is not None for s in known) else None
    counts = {"written": 0, "skipped": 0, "resumed": len(mine) - len(todo)}
    if counts["resumed"]:
        logger.info("%s: %d of this process's %d shards were already finished", split, counts["resumed"], len(mine))
    with tqdm(total=total, desc=f"tokenising {split} [{rank}/{world_size}]", unit="img", unit_scale=True,
              smoothing=0.05) as progress:
        for unit in todo:
            written, skipped = _write_unit(vae, unit, out / shard_name(split, unit.index), patch_nums, with_flip,
                                           seed, signature, progress, text_encoder)
            counts["written"] += written
            counts["skipped"] += skipped
    write_index_when_complete(out, split, len(units))
    return counts


def write_text_encoder(out_dir: str | os.PathLike, encoder: TextEncoder) -> Path:
    """``out_dir/text_encoder.safetensors``: the weights and config of the frozen encoder whose features the cache
    holds, which a text VAR trained on them takes (:func:`varlib.data.token_cache.read_text_encoder`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{TEXT_ENCODER_FILE}.{os.getpid()}.partial"
    save_model(encoder, str(partial), metadata={"config": json.dumps(encoder.config, sort_keys=True)})
    os.replace(partial, out / TEXT_ENCODER_FILE)
    return out / TEXT_ENCODER_FILE


def write_index_when_complete(out: Path, split: str, num_units: int) -> bool:
    """Adds ``split`` to ``out/index.json`` when all its ``num_units`` shards exist; returns whether it did.

    The index is rebuilt from the shards' metadata (any process may be the last to finish) and replaced
    atomically; other splits already in the index are kept.
    """
    paths = [out / shard_name(split, i) for i in range(num_units)]
    if not all(p.is_file() for p in paths):
        return False
    metadata = [read_shard_metadata(p) for p in paths]
    first = metadata[0]
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"splits": {}}
    index.update(format=FORMAT, patch_nums=first["patch_nums"], vocab_size=first["vocab_size"],
                 num_classes=first["num_classes"])
    index["splits"][split] = [p.name for p in paths]
    index.setdefault("skipped", {})[split] = sum(m["skipped"] for m in metadata)
    partial = out / f"index.json.{os.getpid()}.partial"
    partial.write_text(json.dumps(index, indent=1))
    os.replace(partial, index_path)
    return True


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from the environment that ``torchrun`` (or a cluster launcher) sets; (0, 1) alone."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE in the environment, got RANK={rank} WORLD_SIZE={world_size}")
    return rank, world_size


@dataclass
class TokenizeResult:
    """The cache folder, and for this process how many images each split got and how many were skipped."""

    out_dir: Path
    counts: dict[str, int]
    skipped: dict[str, int]


def check_existing_cache(out_dir: Path, patch_nums: tuple[int, ...], vocab_size: int, num_classes: int) -> None:
    """Adding splits to an existing cache is fine only when it was written with the same schedule and classes."""
    if not (out_dir / "index.json").is_file():
        return
    index = read_index(out_dir)
    existing = (tuple(index["patch_nums"]), index["vocab_size"], index["num_classes"])
    if existing != (patch_nums, vocab_size, num_classes):
        raise ValueError(
            f"{out_dir} already holds a token cache with (patch_nums, vocab_size, num_classes) = {existing}; "
            f"this run writes {(patch_nums, vocab_size, num_classes)}: choose another out_dir"
        )


def tokenize_dataset(cfg: DictConfig) -> TokenizeResult:
    """``varlib-tokenize``: tokenises the splits of a ``tokenize`` config (``conf/tokenize.yaml``) into
    ``cfg.out_dir``; returns the per-split image counts (see :mod:`varlib.cli.tokenize`)."""
    splits = list(cfg.splits)
    if not splits or any(split not in SPLITS for split in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names among {list(SPLITS)}, got {splits}")
    check_int_at_least("shard_size", cfg.shard_size, 1)
    check_int_at_least("crops", cfg.crops, 1)
    rank, world_size = distributed_rank()
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    device = rank_device(device, rank, world_size)
    requested = None if cfg.patch_nums is None else validate_patch_nums(list(cfg.patch_nums))
    vae = load_tokenizer(cfg.tokenizer, requested).to(device)
    patch_nums = vae.patch_nums if requested is None else requested
    resolution = patch_nums[-1] * vae.downsample
    if "image_size" not in cfg.data:
        raise ValueError(f"data must be an image dataset config with an image_size (emoji, imagefolder, webdataset), "
                         f"got {cfg.data.get('_target_')}")
    if cfg.data.image_size != resolution:
        logger.info("data.image_size=%s replaced by the tokenizer's resolution %d", cfg.data.image_size, resolution)
    datamodule = instantiate_config(datamodule_config(cfg.data), image_size=resolution)
    if not isinstance(datamodule, ImageDataModule):
        raise ValueError(f"data must build a varlib ImageDataModule, got {type(datamodule).__name__}")
    if datamodule.hflip:
        logger.info("data.hflip is ignored: the cache stores unflipped images (with_flip=true adds mirrored twins)")
    check_existing_cache(Path(cfg.out_dir), patch_nums, vae.vocab_size, datamodule.num_classes)
    class_names = getattr(datamodule, "class_names", None)
    if rank == 0 and class_names is not None:  # training names the model's classes with them
        write_class_names(Path(cfg.out_dir), list(class_names))
    text_encoder = None
    if cfg.text_encoder is not None:
        torch.manual_seed(cfg.seed)  # a config-only encoder is random: every process draws the same weights
        text_encoder = build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True)).to(device).eval()
        if rank == 0:
            write_text_encoder(cfg.out_dir, text_encoder)

    transform = ImageTransform(resolution, train=False) if cfg.crops == 1 else MultiCropTransform(resolution, cfg.crops)
    counts, skipped = {}, {}
    for split in splits:
        units = datamodule.tokenizing_units(split, transform, cfg.shard_size)
        with inference_precision(cfg.precision, device):
            result = tokenize_split(vae, units, cfg.out_dir, split, datamodule.num_classes, patch_nums,
                                    with_flip=cfg.with_flip, crops=cfg.crops, seed=cfg.seed, rank=rank,
                                    world_size=world_size, captions=getattr(datamodule, "captions", False),
                                    text_encoder=text_encoder)
        counts[split], skipped[split] = result["written"], result["skipped"]
        logger.info("%s: %d images tokenised, %d skipped (unreadable or uncaptioned), %d finished shards kept "
                    "(process %d of %d)", split, result["written"], result["skipped"], result["resumed"], rank,
                    world_size)
    return TokenizeResult(out_dir=Path(cfg.out_dir), counts=counts, skipped=skipped)


def write_class_names(out_dir: Path, class_names: list[str]) -> None:
    """``out_dir/class_names.json`` (:data:`~varlib.data.token_cache.CLASS_NAMES_FILE`), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{CLASS_NAMES_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(class_names, indent=1))
    os.replace(partial, out_dir / CLASS_NAMES_FILE)
