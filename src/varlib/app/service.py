"""What the app's pages do, without Gradio: checking a request, running it on the model thread, and the model page.

* Generate: classes by name (``var.class_names``, or the indices as names when the file has none), or prompts for a
  text-conditional model (one per line, with an optional negative prompt), a count per class or prompt and the
  sampling settings (defaults: the model file's ``var.sampling``) -> ``VAR.generate``, batched by
  :class:`varlib.app.worker.ModelWorker`.
* Scale strip: one image of one class or prompt sampled with the same settings (``VAR.generate_tokens``, the sampler
  itself), decoded from the running f_hat after every scale, coarse to fine; its last picture is what
  ``VAR.generate`` returns.
* Edit: an image and a drawn region; the region becomes a pixel keep-mask cropped like the image
  (``varlib.inference.edit_keep_mask``), which ``VAR.edit`` maps to the token grid of every scale
  (``varlib.models.editing``). A text model edits every mode conditioned on a prompt.

Bad input raises ValueError with what was expected and what came; the app shows it in the page.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from varlib.app.worker import ModelWorker
from varlib.data import ImageTransform
from varlib.data.decoding import to_rgb
from varlib.images import unit_float_to_uint8
from varlib.inference import EDIT_MODES, edit_keep_mask, inference_precision, model_resolution, regenerated_tokens
from varlib.models.conditioning import TextConditioning
from varlib.models.transformer import VAR

#: The app's edit modes: varlib.inference.EDIT_MODES, and "class", in-painting conditioned on a class. A text model
#: conditions every mode on a prompt, so that "class" is in-painting there.
APP_EDIT_MODES = (*EDIT_MODES, "class")
MAX_SEED = 2**53 - 1  # the largest integer a JSON number (so the page and the API) carries exactly
#: Uploads larger than this (width x height) are refused from their header, before they are decoded (conf/app.yaml).
MAX_UPLOAD_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class SamplingSettings:
    """The settings of one request; requests with equal settings may share one ``VAR.generate`` call.
    ``negative``: the negative prompt of a text model ("" = the null text)."""

    cfg: float
    top_k: int
    top_p: float
    seed: int
    negative: str = ""


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


def open_upload(source, max_pixels: int) -> Image.Image:
    """An uploaded image (a path or a binary file) opened lazily: its header is read, its pixels are not.

    Raises ValueError naming both sizes when the header says it has more than ``max_pixels`` pixels (or more than
    PIL's own decompression-bomb limit), or when it is no image PIL reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as error:
            raise ValueError(f"{error}; this app accepts at most {max_pixels:,} pixels (max_upload_pixels)") from None
        except (OSError, ValueError) as error:
            raise ValueError(f"the upload is not an image PIL can read: {error}") from None
    check_upload_size(image, max_pixels)
    return image


def check_upload_size(image: Image.Image, max_pixels: int) -> None:
    """Raises ValueError naming both sizes when ``image`` (as its header says) has more than ``max_pixels`` pixels."""
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"the image is {width}x{height} = {width * height:,} pixels, more than the {max_pixels:,} "
                         f"this app accepts (max_upload_pixels); upload a smaller one")


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
        max_images: images one Generate request may ask for (classes or prompts x count).
        precision: ``fp32``, ``bf16`` or ``auto`` (see :func:`varlib.inference.inference_precision`).
        source: where the model came from (shown on the model page); ``model_card``: its card (markdown) or None.
        max_upload_pixels: uploads to Edit larger than this (width x height) are refused before they are decoded.
    """

    def __init__(self, var: VAR, batch_size: int = 8, max_images: int = 16, precision: str = "fp32",
                 source: str = "", model_card: str | None = None, max_upload_pixels: int = MAX_UPLOAD_PIXELS) -> None:
        if max_images < 1 or max_upload_pixels < 1:
            raise ValueError(f"max_images and max_upload_pixels must be >= 1, got {max_images}, {max_upload_pixels}")
        self.var, self.max_images, self.precision = var, max_images, precision
        self.max_upload_pixels = max_upload_pixels
        self.source, self.card = source, model_card
        self.text = isinstance(var.conditioning, TextConditioning)  # takes prompts instead of classes
        self.class_names = [] if self.text else class_names_of(var)
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

    def prompts(self, text: Any) -> list[str]:
        """The prompts of ``text`` (one per line, or a list of them), stripped, blank lines left out; ValueError
        when there is none."""
        lines = text.splitlines() if isinstance(text, str) else [] if text is None else text
        if not isinstance(lines, (list, tuple)) or not all(isinstance(line, str) for line in lines):
            raise ValueError(f"prompts must be text, one prompt per line, got {text!r}")
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError("type at least one prompt (one per line): got none")
        return prompts

    def one_prompt(self, text: Any, what: str) -> str:
        """The single prompt of ``text`` (see :meth:`prompts`); ``what`` says what it is for in the message."""
        prompts = self.prompts(text)
        if len(prompts) != 1:
            raise ValueError(f"{what} takes one prompt, got {len(prompts)}: {prompts}")
        return prompts[0]

    def negative_prompt(self, negative: Any) -> str:
        """The negative prompt, stripped ("" = none); ValueError for anything but text, or one for a class model."""
        if negative is None:
            return ""
        if not isinstance(negative, str):
            raise ValueError(f"the negative prompt must be text, got {negative!r}")
        if negative.strip() and not self.text:
            raise ValueError("this model is class-conditional: it takes no negative prompt")
        return negative.strip()

    def settings(self, cfg: Any, top_k: Any, top_p: Any, seed: Any, negative: Any = "") -> SamplingSettings:
        """Checked sampling settings: cfg >= 0, top_k in [0, vocabulary], top_p in [0, 1], seed in [0, 2^53), a
        negative prompt for a text model."""
        return SamplingSettings(cfg=_number("cfg", cfg, 0, 1e6, integer=False),
                                top_k=_number("top_k", top_k, 0, self.var.vocab_size, integer=True),
                                top_p=_number("top_p", top_p, 0, 1, integer=False),
                                seed=_number("seed", seed, 0, MAX_SEED, integer=True),
                                negative=self.negative_prompt(negative))

    def default_settings(self) -> SamplingSettings:
        """The model file's recommended settings (``var.sampling``), top_k clipped to the vocabulary (the page's
        range), seed 0."""
        sampling = self.var.sampling.resolve()
        return SamplingSettings(cfg=sampling["cfg"], top_k=min(sampling["top_k"], self.var.vocab_size),
                                top_p=sampling["top_p"], seed=0)

    # -- generate ------------------------------------------------------------------------------------

    def generate(self, classes: Any, count: Any, cfg: Any, top_k: Any, top_p: Any, seed: Any,
                 negative: Any = "") -> list[tuple[np.ndarray, str]]:
        """``count`` images of each class, in class order: (H,W,3) uint8 images with their class names. A text
        model takes prompts instead of classes (see :meth:`prompts`) and a negative prompt, and captions each image
        with its prompt."""
        if self.text:
            conditions = captions = self.prompts(classes)
            what = "prompts"
        else:
            if isinstance(classes, str):
                classes = [classes]
            if not classes:
                raise ValueError("pick at least one class, got none")
            conditions = [self.class_index(name) for name in classes]
            captions, what = classes, "classes"
        per_condition = _number("count", count, 1, self.max_images, integer=True)
        total = per_condition * len(conditions)
        if total > self.max_images:
            raise ValueError(f"at most {self.max_images} images per request, got {len(conditions)} {what} x "
                             f"{per_condition} = {total}")
        settings = self.settings(cfg, top_k, top_p, seed, negative)
        conditions = [condition for condition in conditions for _ in range(per_condition)]
        captions = [caption for caption in captions for _ in range(per_condition)]
        images = self.worker.generate(conditions, settings).result()
        return list(zip(to_uint8_images(images), captions))

    def _sampling_options(self, settings: SamplingSettings) -> dict[str, Any]:
        """``VAR.generate``'s keyword arguments for ``settings``."""
        return dict(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                    negative=settings.negative or None)

    def _generate_batch(self, conditions: list[int] | list[str], settings: SamplingSettings) -> torch.Tensor:
        """One ``VAR.generate`` call (on the model thread)."""
        with inference_precision(self.precision, self.var.device):
            return self.var.generate(conditions, **self._sampling_options(settings)).float().cpu()

    def scale_strip(self, class_name: Any, cfg: Any, top_k: Any, top_p: Any, seed: Any,
                    negative: Any = "") -> list[tuple[np.ndarray, str]]:
        """One image of ``class_name`` (a text model: of one prompt, with an optional negative prompt) after each
        scale, coarse to fine: (H,W,3) uint8 images captioned with the scale's token grid ("4x4"); the last equals
        ``VAR.generate([class], seed=seed, ...)``."""
        condition = self.one_prompt(class_name, "the scale strip") if self.text else self.class_index(class_name)
        settings = self.settings(cfg, top_k, top_p, seed, negative)

        def strip() -> list[torch.Tensor]:
            with inference_precision(self.precision, self.var.device), torch.no_grad():
                out = self.var.generate_tokens([condition], **self._sampling_options(settings))
                return running_fhat_images(self.var, out.tokens)

        frames = self.worker.call(strip).result()
        return [(to_uint8_images(frame)[0], f"{pn}x{pn}") for frame, pn in zip(frames, self.var.patch_nums)]

    # -- edit ------------------------------------------------------------------------------------------

    def drawn_region(self, background: Image.Image, layers: Sequence[Image.Image | None]) -> Image.Image:
        """The drawn layers (their opaque pixels) -> a greyscale mask of the background's size, white where drawn."""
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
        return Image.fromarray(np.where(alpha, 255, 0).astype(np.uint8), mode="L")

    def edit(self, background: Image.Image | None, layers: Sequence[Image.Image | None], mode: Any,
             target_class: Any, seed: Any) -> EditOutcome:
        """Regenerates the region drawn on ``background`` (see :meth:`drawn_region`), or the rest (out-painting),
        with ``VAR.edit`` and the model's sampling settings: unconditionally for in- and out-painting, conditioned
        on ``target_class`` for class-conditional editing. A text model takes a prompt as ``target_class`` and
        is conditioned on it in every mode."""
        if background is None:
            raise ValueError("upload an image (or pick an example) to edit: got none")
        if mode not in APP_EDIT_MODES:
            raise ValueError(f"mode must be one of {APP_EDIT_MODES}, got {mode!r}")
        if self.text:
            condition = self.one_prompt(target_class, "editing")
        else:
            condition = self.class_index(target_class) if mode == "class" else self.var.num_classes
        defaults = self.default_settings()
        settings = self.settings(defaults.cfg, defaults.top_k, defaults.top_p, seed)
        check_upload_size(background, self.max_upload_pixels)
        image = to_rgb(background)
        transform = ImageTransform(self.resolution, train=False)
        keep_HW = edit_keep_mask(transform, "outpaint" if mode == "outpaint" else "inpaint",
                                 mask=self.drawn_region(background, layers), image_size=image.size)
        regenerated = regenerated_tokens(keep_HW, self.var)[0]
        image_13HW = transform(image).unsqueeze(0)

        def edit() -> torch.Tensor:
            device = self.var.device
            with inference_precision(self.precision, device):
                return self.var.edit(image_13HW.to(device), keep_HW.to(device), [condition], cfg=settings.cfg,
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
        classes (a text model: its conditioning and text encoder) and the model card."""
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
            self._conditioning_row(),
            ("batching", f"up to {self.worker.batch_size} images per generate call"),
        ]
        table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
        configs = json.dumps({"var": var.config, "tokenizer": vae.config}, indent=1, default=list)
        card = self.card if self.card else "This model has no model card (a `README.md` beside its weights)."
        return f"{table}\n\n### Model card\n\n{card}\n\n### Configs\n\n```json\n{configs}\n```\n"

    def _conditioning_row(self) -> tuple[str, str]:
        """The model page's row on what the model is conditioned on: its classes, or its text encoder."""
        var = self.var
        if not self.text:
            return "classes", f"{var.num_classes}: {', '.join(self.class_names[:50])}" + (
                " ..." if var.num_classes > 50 else "")
        kind, encoder = var.conditioning.describe()
        attention = "with" if var.conditioning.context_dim is not None else "without"
        return "conditioning", f"{kind} (prompts): {encoder}, {attention} cross-attention"


def model_card_text(checkpoint: str | None) -> str | None:
    """The model card of a checkpoint: ``README.md`` in a ``save_pretrained`` folder (the Hub convention) or beside
    a model file; None when there is none."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    card = path / "README.md" if path.is_dir() else path.with_name("README.md")
    return card.read_text() if card.is_file() else None

