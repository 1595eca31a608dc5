"""What the app's pages do, without Gradio: checking a request, running it on the model thread, and the model page.

* Generate: classes by name (``var.class_names``, or the indices as names when the file has none), a count per
  class and the sampling settings (defaults: the model file's ``var.sampling``) -> ``VAR.generate``, batched by
  :class:`varlib.app.worker.ModelWorker`.
* Scale strip: one image sampled with the same settings (``VAR.generate_tokens``, the sampler itself), decoded from
  the running f_hat after every scale, coarse to fine; its last picture is what ``VAR.generate`` returns.
* Edit: an image and a drawn region; the region becomes a pixel keep-mask cropped like the image
  (``varlib.inference.keep_mask_from_image``), which ``VAR.edit`` maps to the token grid of every scale
  (``varlib.models.editing``).

Bad input raises ValueError with what was expected and what came; the app shows it in the page.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from varlib.app.worker import ModelWorker
from varlib.data import ImageTransform
from varlib.data.images import to_rgb
from varlib.images import unit_float_to_uint8
from varlib.inference import inference_precision, keep_mask_from_image, model_resolution, regenerated_tokens
from varlib.models.transformer import VAR

#: Edit modes: the drawn region is regenerated (in-painting, class-conditional editing) or kept (out-painting).
EDIT_MODES = ("inpaint", "outpaint", "class")
MAX_SEED = 2**53 - 1  # the largest integer a JSON number (so the page and the API) carries exactly


@dataclass(frozen=True)
class SamplingSettings:
    """The settings of one request; requests with equal settings may share one ``VAR.generate`` call."""

    cfg: float
    top_k: int
    top_p: float
    seed: int


@dataclass
class EditOutcome:
    """Images (H,W,3) uint8: the input as the model sees it (cropped), the regenerated tokens (white) on the token
    grid scaled to the image, and the edited image; ``tokens`` counts the regenerated last-scale tokens."""

    before: np.ndarray
    region: np.ndarray
    after: np.ndarray
    tokens: int


def to_uint8_images(images_B3HW: torch.Tensor) -> list[np.ndarray]:
    """(B,3,H,W) in [0,1] -> B arrays (H,W,3) uint8."""
    return list(unit_float_to_uint8(images_B3HW.float().cpu()).permute(0, 2, 3, 1).numpy())


def class_names_of(var: VAR) -> list[str]:
    """The model file's class names, or the class indices as names when it has none."""
    names = getattr(var, "class_names", None)
    return list(names) if names else [str(index) for index in range(var.num_classes)]


def running_fhat_images(var: VAR, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The picture after each scale: K images (B,3,H,W) in [0,1], decoded from f_hat accumulated as the sampler
    accumulates it (``quantize.accumulate`` of each scale's code vectors), coarse to fine.

    Args:
        tokens: the K token maps (B, pn^2) of :meth:`VAR.generate_tokens` (``SampleOutput.tokens``).
    """
    quantize, patch_nums, side = var.vae.quantize, var.patch_nums, var.patch_nums[-1]
    f_hat = torch.zeros(tokens[0].shape[0], var.code_channels, side, side, device=tokens[0].device)
    frames = []
    for scale, (tokens_Bl, pn) in enumerate(zip(tokens, patch_nums)):
        f_hat, _ = quantize.accumulate(f_hat, quantize.embed(tokens_Bl, pn).float(), scale, patch_nums)
        frames.append(var.vae.fhat_to_img(f_hat).add(1).mul(0.5))
    return frames


def _number(name: str, value: Any, low: float, high: float, integer: bool) -> float | int:
    """``value`` as a finite number in [low, high] (an int when ``integer``), else ValueError naming both."""
    kind = "an integer" if integer else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high or (integer and not number.is_integer()):
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return int(number) if integer else number


class AppService:
    """The app's actions on one VAR (with its tokenizer at ``.vae``), all run on one :class:`ModelWorker`.

    Args:
        var: the model, in eval mode.
        batch_size: images one ``VAR.generate`` call samples at most (see :class:`ModelWorker`); 1 = no batching.
        max_images: images one Generate request may ask for (classes x count).
        precision: ``fp32``, ``bf16`` or ``auto`` (see :func:`varlib.inference.inference_precision`).
        source: where the model came from (shown on the model page); ``model_card``: its card (markdown) or None.
    """

    def __init__(self, var: VAR, batch_size: int = 8, max_images: int = 16, precision: str = "fp32",
                 source: str = "", model_card: str | None = None) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.var, self.max_images, self.precision = var, max_images, precision
        self.source, self.card = source, model_card
        self.class_names = class_names_of(var)
        self.resolution = model_resolution(var)
        self.worker = ModelWorker(self._generate_batch, batch_size)

    def close(self) -> None:
        self.worker.close()

    # -- checks --------------------------------------------------------------------------------------

    def class_index(self, name: Any) -> int:
        """The index of a class name; ValueError listing the known names for anything else."""
        if isinstance(name, str) and name in self.class_names:
            return self.class_names.index(name)
        shown = ", ".join(self.class_names[:20]) + (" ..." if len(self.class_names) > 20 else "")
        raise ValueError(f"unknown class {name!r}: expected one of the model's classes ({shown})")

    def settings(self, cfg: Any, top_k: Any, top_p: Any, seed: Any) -> SamplingSettings:
        """Checked sampling settings: cfg >= 0, top_k in [0, vocabulary], top_p in [0, 1], seed in [0, 2^53)."""
        return SamplingSettings(cfg=_number("cfg", cfg, 0, 1e6, integer=False),
                                top_k=_number("top_k", top_k, 0, self.var.vocab_size, integer=True),
                                top_p=_number("top_p", top_p, 0, 1, integer=False),
                                seed=_number("seed", seed, 0, MAX_SEED, integer=True))

    def default_settings(self) -> SamplingSettings:
        """The model file's recommended settings (``var.sampling``), top_k clipped to the vocabulary, seed 0."""
        sampling = self.var.sampling
        return SamplingSettings(cfg=sampling.cfg, top_k=min(sampling.top_k, self.var.vocab_size),
                                top_p=sampling.top_p, seed=0)

    # -- generate ------------------------------------------------------------------------------------

    def generate(self, classes: Any, count: Any, cfg: Any, top_k: Any, top_p: Any,
                 seed: Any) -> list[tuple[np.ndarray, str]]:
        """``count`` images of each class, in class order: (H,W,3) uint8 images with their class names."""
        if isinstance(classes, str):
            classes = [classes]
        if not classes:
            raise ValueError("pick at least one class, got none")
        labels = [self.class_index(name) for name in classes]
        per_class = _number("count", count, 1, self.max_images, integer=True)
        total = per_class * len(labels)
        if total > self.max_images:
            raise ValueError(f"at most {self.max_images} images per request, got {len(labels)} classes x "
                             f"{per_class} = {total}")
        settings = self.settings(cfg, top_k, top_p, seed)
        labels = [label for label in labels for _ in range(per_class)]
        images = self.worker.generate(labels, settings).result()
        return [(image, self.class_names[label]) for image, label in zip(to_uint8_images(images), labels)]

    def _generate_batch(self, labels: list[int], settings: SamplingSettings) -> torch.Tensor:
        """One ``VAR.generate`` call (on the model thread)."""
        with inference_precision(self.precision, self.var.device):
            return self.var.generate(labels, cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p,
                                     seed=settings.seed).float().cpu()

    def scale_strip(self, class_name: Any, cfg: Any, top_k: Any, top_p: Any,
                    seed: Any) -> list[tuple[np.ndarray, str]]:
        """One image of ``class_name`` after each scale, coarse to fine: (H,W,3) uint8 images captioned with the
        scale's token grid ("4x4"); the last equals ``VAR.generate([class], seed=seed, ...)``."""
        label = self.class_index(class_name)
        settings = self.settings(cfg, top_k, top_p, seed)

        def strip() -> list[torch.Tensor]:
            with inference_precision(self.precision, self.var.device), torch.no_grad():
                out = self.var.generate_tokens([label], cfg=settings.cfg, top_k=settings.top_k,
                                               top_p=settings.top_p, seed=settings.seed)
                return running_fhat_images(self.var, out.tokens)

        frames = self.worker.call(strip).result()
        return [(to_uint8_images(frame)[0], f"{pn}x{pn}") for frame, pn in zip(frames, self.var.patch_nums)]

    # -- edit ------------------------------------------------------------------------------------------

    def region_to_regenerate(self, background: Image.Image, layers: Sequence[Image.Image | None],
                             mode: str) -> Image.Image:
        """The drawn layers (their opaque pixels) -> a greyscale mask of the background's size, white where the
        model regenerates: the drawn region (in-painting, class-conditional editing) or the rest (out-painting)."""
        drawn = [layer for layer in layers if layer is not None]
        if not drawn:
            raise ValueError("draw the region to regenerate on the image: got no drawing")
        alpha = np.zeros((background.height, background.width), dtype=bool)
        for layer in drawn:
            if layer.size != background.size:
                raise ValueError(f"the drawing must have the image's size (width, height) {background.size}, "
                                 f"got {layer.size}")
            if "A" not in layer.getbands():
                raise ValueError(f"the drawing must be a transparent layer (mode RGBA or LA), got mode {layer.mode}")
            alpha |= np.asarray(layer.getchannel("A")) > 0
        if not alpha.any():
            raise ValueError("the drawing is empty: draw over the region to regenerate")
        regenerate = ~alpha if mode == "outpaint" else alpha
        return Image.fromarray(np.where(regenerate, 255, 0).astype(np.uint8), mode="L")

    def edit(self, background: Image.Image | None, layers: Sequence[Image.Image | None], mode: Any,
             target_class: Any, seed: Any) -> EditOutcome:
        """Regenerates the region drawn on ``background`` (see :meth:`region_to_regenerate`) with ``VAR.edit``
        and the model's sampling settings: unconditionally for in- and out-painting, conditioned on
        ``target_class`` for class-conditional editing."""
        if background is None:
            raise ValueError("upload an image (or pick an example) to edit: got none")
        if mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
        label = self.class_index(target_class) if mode == "class" else self.var.num_classes
        settings = self.settings(self.var.sampling.cfg, min(self.var.sampling.top_k, self.var.vocab_size),
                                 self.var.sampling.top_p, seed)
        image = to_rgb(background)
        transform = ImageTransform(self.resolution, train=False)
        keep_HW = keep_mask_from_image(self.region_to_regenerate(background, layers, mode), image.size, transform)
        regenerated = regenerated_tokens(keep_HW, self.var)[0]
        image_13HW = transform(image).unsqueeze(0)

        def edit() -> torch.Tensor:
            device = self.var.device
            with inference_precision(self.precision, device):
                return self.var.edit(image_13HW.to(device), keep_HW.to(device), [label], cfg=settings.cfg,
                                     top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed).float().cpu()

        after = self.worker.call(edit).result()
        cell = self.resolution // regenerated.shape[0]
        region = regenerated.float().repeat_interleave(cell, 0).repeat_interleave(cell, 1).expand(3, -1, -1)
        before, region_image, after_image = to_uint8_images(torch.stack([image_13HW[0].add(1).mul(0.5), region,
                                                                         after[0]]))
        return EditOutcome(before=before, region=region_image, after=after_image, tokens=int(regenerated.sum()))

    # -- model page ------------------------------------------------------------------------------------

    def model_card(self) -> str:
        """The model page (markdown): architecture, parameter counts, tokenizer, schedule, sampling settings,
        classes and the model card."""
        var, vae = self.var, self.var.vae
        total = sum(p.numel() for p in var.parameters())
        rows = [
            ("source", f"`{self.source}`" if self.source else "(built in memory)"),
            ("architecture", f"VAR, depth {var.depth}, width {var.width}, {var.num_heads} heads"),
            ("parameters", f"{total:,} (transformer), {var.num_non_embedding_params():,} without embeddings"),
            ("tokenizer", f"multi-scale VQVAE, {vae.vocab_size:,} codes of {vae.z_channels} channels, "
                          f"downsampling {vae.downsample}x, {sum(p.numel() for p in vae.parameters()):,} parameters"),
            ("schedule", f"{len(var.patch_nums)} scales {', '.join(f'{pn}x{pn}' for pn in var.patch_nums)}; "
                         f"{var.L} tokens; {self.resolution}x{self.resolution} px"),
            ("sampling (the file's)", ", ".join(f"{k}={v}" for k, v in asdict(var.sampling).items())),
            ("classes", f"{var.num_classes}: {', '.join(self.class_names[:50])}"
                        + (" ..." if var.num_classes > 50 else "")),
            ("batching", f"up to {self.worker.batch_size} images per generate call"),
        ]
        table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
        configs = json.dumps({"var": var.config, "tokenizer": vae.config}, indent=1, default=list)
        card = self.card if self.card else "This model has no model card (a `README.md` beside its weights)."
        return f"{table}\n\n### Model card\n\n{card}\n\n### Configs\n\n```json\n{configs}\n```\n"


def model_card_text(checkpoint: str | None) -> str | None:
    """The model card of a checkpoint: ``README.md`` in a ``save_pretrained`` folder (the Hub convention) or beside
    a model file; None when there is none."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    card = path / "README.md" if path.is_dir() else path.with_name("README.md")
    return card.read_text() if card.is_file() else None

