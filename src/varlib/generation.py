"""Generating with a VAR as the sampling tools (``varlib-sample``, ``varlib-edit``, ``varlib-evaluate``, the app) do:
the model a config names, the labels, the sampling settings, seeded batches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

import varlib
from varlib.data.base import check_int_at_least
from varlib.inference import inference_precision
from varlib.models.sampling import check_sampling_values
from varlib.models.transformer import VAR

logger = logging.getLogger(__name__)


def _existing_path(path: str | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required, got null")
    resolved = Path(str(path)).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{what}: expected a model file or folder at {resolved}, got nothing there")
    return resolved


def load_var_model(cfg: DictConfig, device: torch.device) -> VAR:
    """The VAR (with its tokenizer at ``.vae``) named by ``cfg.checkpoint`` or by ``cfg.official.vae`` + ``.var``.

    ``checkpoint`` is a varlib ``.safetensors`` file or Lightning checkpoint holding a VAR; ``official.vae`` and
    ``official.var`` are the FoundationVision files (e.g. ``vae_ch160v4096z32.pth`` and ``var_d16.pth``);
    ``official.patch_nums`` (optional) sets the tokenizer's schedule when it cannot be inferred.
    Exactly one of the two ways must be given. Returns the model in eval mode on ``device``.
    """
    official = cfg.get("official") or {}
    has_official = official.get("vae") is not None or official.get("var") is not None
    if (cfg.get("checkpoint") is None) == (not has_official):
        raise ValueError(
            "expected exactly one model source: checkpoint=<varlib file> or official.vae=<vae .pth> "
            f"official.var=<var .pth>, got checkpoint={cfg.get('checkpoint')!r}, official.vae={official.get('vae')!r}, "
            f"official.var={official.get('var')!r}"
        )
    if cfg.get("checkpoint") is not None:
        path = _existing_path(cfg.checkpoint, "checkpoint")
        model = varlib.load(path)
        if not isinstance(model, VAR):
            raise ValueError(f"checkpoint {path}: expected a VAR model file, got a {type(model).__name__}; "
                             "official checkpoints go in official.vae and official.var")
    else:
        vae, var = _existing_path(official.get("vae"), "official.vae"), _existing_path(official.get("var"), "official.var")
        model = varlib.load(var, vae=vae, patch_nums=official.get("patch_nums"))
        if not isinstance(model, VAR):
            raise ValueError(f"official.var={official.var}: expected a VAR transformer, got a {type(model).__name__}")
    logger.info("loaded VAR depth=%d width=%d classes=%d schedule=%s", model.depth, model.width,
                model.num_classes, model.patch_nums)
    return model.to(device).eval()


def parse_label(value: Any, num_classes: int) -> int:
    """One class index: an int in [0, num_classes] (``num_classes`` = the unconditional null class), or
    None for the null class. Raises ValueError naming the accepted range."""
    if value is None:
        return num_classes
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= num_classes:
        raise ValueError(
            f"label must be an integer in [0, {num_classes}] ({num_classes} = unconditional) or null, got {value!r}"
        )
    return int(value)


def parse_labels(value: Any, num_classes: int, per_class: int) -> list[int]:
    """The labels to sample: a list (or one int) of classes in [0, num_classes], or None for ``per_class``
    samples of every class 0..num_classes-1 in class order."""
    if value is None:
        check_int_at_least("per_class", per_class, 1)
        return [c for c in range(num_classes) for _ in range(per_class)]
    values = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else list(value)
    if not values:
        raise ValueError("labels must name at least one class, got an empty list")
    return [parse_label(v, num_classes) for v in values]


def sampling_options(cfg: DictConfig, model: VAR) -> dict[str, Any]:
    """The ``VAR.generate`` keyword arguments: each of ``cfg``, ``top_k``, ``top_p`` the config sets (not null),
    else the model's own (its ``sampling``), validated; plus ``more_smooth``."""
    given = {key: cfg[key] for key in ("cfg", "top_k", "top_p") if cfg[key] is not None}
    try:
        options = model.sampling.resolve(**{key: type(getattr(model.sampling, key))(value) for key, value in given.items()})
    except (TypeError, ValueError) as error:
        raise ValueError(f"cfg, top_k and top_p must be numbers or null, got {given}") from error
    check_sampling_values(**options)
    return {**options, "more_smooth": bool(cfg.more_smooth)}


def generate_in_batches(
    var: VAR, labels: Sequence[int] | Sequence[str], batch_size: int, seed: int, options: dict[str, Any],
    desc: str = "sampling",
    precision: str = "fp32", batches: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Yields ``(images (b,3,H,W) in [0,1] on the CPU, their labels)`` for consecutive chunks of ``labels``
    (a text model's prompts).

    Batch i is sampled with seed ``seed + i``, so a run is reproducible for a fixed batch_size (images
    depend on how labels are grouped, because a batch shares one random stream). ``batches`` (indices i,
    default all) selects which chunks are sampled, in that order: a share of the run gives the same images
    as the whole. Only the sampling runs in ``precision`` (see :func:`inference_precision`), not what the
    caller does with the images.
    """
    check_int_at_least("batch_size", batch_size, 1)
    device = var.device
    num_batches = -(-len(labels) // batch_size)
    indices = range(num_batches) if batches is None else list(batches)
    if any(not 0 <= index < num_batches for index in indices):
        raise ValueError(f"batch indices must lie in [0, {num_batches}), got {list(indices)}")
    for index in tqdm(indices, desc=desc, unit="batch"):
        start = index * batch_size
        chunk = list(labels[start:start + batch_size])
        with inference_precision(precision, device):
            images = var.generate(chunk, seed=seed + index, **options).float().cpu()
        yield images, chunk
