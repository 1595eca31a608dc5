"""Mapping pretrained weights onto a model of another shape: fine-tuning's ``model.init_from``.

:func:`transfer_state` fills a freshly built model's state dict from a pretrained one, key by key:

- same name and shape: copied;
- the class embedding (``class_emb.weight``, (num_classes + 1, C)) with another class count: the null row (the
  last, used by classifier-free guidance and label dropout) moves to the new last index; ``class_map``
  (new index -> pretrained index) copies the rows of classes that carry over; every other new row starts from
  the mean of the pretrained class rows (the null row left out), a class-like point between the known ones;
- the per-token position embedding (``pos_1LC``, (1, L, C)) under another patch schedule: each scale's pn x pn
  grid is resized to the new scale's side with bicubic interpolation (``align_corners=False``, as ViT position
  embeddings are resized: it keeps the learned 2-D layout smooth where nearest would repeat rows and bilinear
  blurs the peaks more); a scale beyond the pretrained ones starts from the pretrained finest scale;
- the level embedding (``lvl_embed.weight``, (K, C)) with more scales: the pretrained rows, then copies of the
  last one for the extra scales (fewer scales keep the first K rows);
- buffers that the schedule defines (``lvl_1L``, ``attn_bias_for_masking``, ``attn_mask``): the new model's own;
- keys only the new model has: left as initialised; keys only the pretrained model has: dropped.

Any other shape difference is an error naming the parameter and both shapes. :func:`merge_lora_state` folds LoRA
adapters (the ``peft`` layout) into plain weights, so files of LoRA runs open without ``peft``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from varlib.models.patch_schedules import scale_slices

#: buffers that a model derives from its schedule: never transferred, always the new model's
SCHEDULE_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "attn_mask")
CLASS_EMBEDDING = "class_emb.weight"
POSITION_EMBEDDING = "pos_1LC"
LEVEL_EMBEDDING = "lvl_embed.weight"


@dataclass
class TransferReport:
    """What :func:`transfer_state` did with each key: ``loaded`` (copied as is), ``resized`` (key -> how),
    ``reinitialised`` (kept the new model's initial values), ``dropped`` (pretrained keys with no place)."""

    loaded: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def names(items) -> str:
            items = sorted(items)
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "") or "none"
        resized = "; ".join(f"{k}: {v}" for k, v in sorted(self.resized.items())) or "none"
        return (f"loaded {len(self.loaded)} tensors; resized [{resized}]; re-initialised "
                f"{len(self.reinitialised)} [{names(self.reinitialised)}]; dropped {len(self.dropped)} "
                f"[{names(self.dropped)}]")


def resize_class_embedding(source_KC: torch.Tensor, num_rows: int,
                           class_map: Mapping[int, int] | None = None) -> torch.Tensor:
    """The (num_rows, C) class embedding (num_rows - 1 classes + null) from a pretrained (K, C) one (K - 1 classes
    + null): null row last, ``class_map`` rows (new index -> pretrained index) copied, the rest the mean of the
    pretrained class rows. Without ``class_map``, classes keep their index when the counts are equal."""
    old_classes, new_classes = source_KC.shape[0] - 1, num_rows - 1
    if class_map is None:
        class_map = {i: i for i in range(new_classes)} if old_classes == new_classes else {}
    for new, old in class_map.items():
        if not (0 <= int(new) < new_classes and 0 <= int(old) < old_classes):
            raise ValueError(f"model.class_map entry {new} -> {old}: expected a new class in [0, {new_classes}) "
                             f"and a pretrained class in [0, {old_classes})")
    out = source_KC[:-1].mean(0, keepdim=True).repeat(num_rows, 1)
    for new, old in class_map.items():
        out[int(new)] = source_KC[int(old)]
    out[-1] = source_KC[-1]
    return out


def resize_position_embedding(source_1LC: torch.Tensor, source_patch_nums: Sequence[int],
                              patch_nums: Sequence[int]) -> torch.Tensor:
    """Per-scale bicubic resize of a (1, L, C) position embedding from ``source_patch_nums`` to ``patch_nums``
    (scale k from pretrained scale min(k, K-1)): (1, L', C)."""
    source = [source_1LC[:, sl] for sl in scale_slices(source_patch_nums)]
    out = []
    for k, pn in enumerate(patch_nums):
        k_src = min(k, len(source_patch_nums) - 1)
        pn_src = source_patch_nums[k_src]
        grid = source[k_src].reshape(1, pn_src, pn_src, -1).permute(0, 3, 1, 2).float()
        if pn != pn_src:
            grid = F.interpolate(grid, size=(pn, pn), mode="bicubic", align_corners=False)
        out.append(grid.permute(0, 2, 3, 1).reshape(1, pn * pn, -1))
    return torch.cat(out, dim=1).to(source_1LC.dtype)


def extend_level_embedding(source_KC: torch.Tensor, num_levels: int) -> torch.Tensor:
    """The first ``num_levels`` rows of a (K, C) level embedding, the last row repeated for extra levels."""
    extra = max(num_levels - source_KC.shape[0], 0)
    return torch.cat([source_KC[:num_levels], source_KC[-1:].expand(extra, -1)], dim=0)


def transfer_state(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], *,
                   target_patch_nums: Sequence[int] | None = None,
                   source_patch_nums: Sequence[int] | None = None,
                   class_map: Mapping[int, int] | None = None,
                   what: str = "model") -> tuple[dict[str, torch.Tensor], TransferReport]:
    """The new model's state dict ``target`` filled from the pretrained ``source`` (see the module doc), and the
    report. The patch schedules (given for transformers) let the position and level embeddings be resized.

    Raises ValueError naming the parameter and both shapes for a difference that cannot be mapped."""
    report = TransferReport()
    out = dict(target)
    schedule_changed = (target_patch_nums is not None and source_patch_nums is not None
                        and tuple(target_patch_nums) != tuple(source_patch_nums))
    for name, new in target.items():
        if name.endswith(SCHEDULE_BUFFERS):
            continue  # the new model's schedule defines them
        if name not in source:
            report.reinitialised.append(name)
            continue
        old = source[name]
        if name == CLASS_EMBEDDING and old.shape != new.shape and old.shape[1:] == new.shape[1:]:
            out[name] = resize_class_embedding(old, new.shape[0], class_map).to(new.dtype)
            report.resized[name] = f"{old.shape[0] - 1} -> {new.shape[0] - 1} classes, null row moved to {new.shape[0] - 1}"
            continue
        if name == CLASS_EMBEDDING and class_map is not None and old.shape == new.shape:
            out[name] = resize_class_embedding(old, new.shape[0], class_map).to(new.dtype)
            report.resized[name] = f"rows rearranged by class_map ({len(class_map)} carried)"
            continue
        if name.endswith(POSITION_EMBEDDING) and schedule_changed and old.shape[2:] == new.shape[2:]:
            out[name] = resize_position_embedding(old, source_patch_nums, target_patch_nums).to(new.dtype)
            report.resized[name] = f"per-scale bicubic {tuple(source_patch_nums)} -> {tuple(target_patch_nums)}"
            continue
        if name.endswith(LEVEL_EMBEDDING) and old.shape != new.shape and old.shape[1:] == new.shape[1:]:
            out[name] = extend_level_embedding(old, new.shape[0]).to(new.dtype)
            report.resized[name] = f"{old.shape[0]} -> {new.shape[0]} levels (extra levels copy the last)"
            continue
        if old.shape != new.shape:
            raise ValueError(f"init_from: {what} parameter {name!r} has shape {tuple(old.shape)} in the pretrained "
                             f"model and {tuple(new.shape)} in the new one, and no mapping between them")
        out[name] = old.to(new.dtype)
        report.loaded.append(name)
    report.dropped = sorted(k for k in source if k not in target and not k.endswith(SCHEDULE_BUFFERS))
    if not report.loaded and not report.resized:
        raise ValueError(f"init_from: no pretrained tensor fits the {what} (pretrained keys "
                         f"{sorted(source)[:5]}..., new keys {sorted(target)[:5]}...): is it the right kind of model?")
    return out, report


def lora_scaling(config: Mapping) -> float:
    """The factor of a LoRA update B @ A: alpha / r (peft's default, without rank-stabilised scaling)."""
    return float(config["alpha"]) / float(config["r"])


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float,
                     adapter: str = "default") -> dict[str, torch.Tensor]:
    """The plain state dict of a model with LoRA adapters in the ``peft`` layout: each ``X.base_layer.weight``
    becomes ``X.weight`` + scaling * ``X.lora_B.<adapter>.weight`` @ ``X.lora_A.<adapter>.weight`` and the
    adapters go (the other ``base_layer`` tensors lose that name part). A state dict without adapters is
    returned as is."""
    merged = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            merged[name] = value
            continue
        module, leaf = name.split(".base_layer.")
        if leaf == "weight":
            down, up = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
            value = value + scaling * (up.float() @ down.float()).to(value.dtype)
        merged[f"{module}.{leaf}"] = value
    return merged
