"""VAR's image preprocessing recipe in plain PIL + torch (no torchvision).

Official recipe (VAR `build_dataset`): resize the shorter side to round(1.125 * res) with LANCZOS,
RandomCrop(res) for training or CenterCrop(res) for evaluation, optional horizontal flip for
training, ToTensor, then map [0, 1] to [-1, 1]. Sizes and crop offsets follow torchvision's
arithmetic so outputs match the original pipeline pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESIZE_RATIO = 1.125


def resize_target(resolution: int) -> int:
    """Shorter-side length the image is resized to before cropping: round(1.125 * resolution)."""
    return round(RESIZE_RATIO * resolution)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize with LANCZOS so that the shorter side equals `size`, keeping the aspect ratio.

    The longer side is truncated as torchvision does: int(size * long / short). An image that
    already has the target size is returned unchanged.
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def pil_to_unit_range(image: Image.Image) -> torch.Tensor:
    """RGB PIL image (W, H) -> float32 tensor (3, H, W) with values in [-1, 1]."""
    pixels_HWC = torch.from_numpy(np.array(image, dtype=np.uint8))
    # Same float ops as ToTensor + VAR's x + x - 1, so values match the original bit for bit.
    return pixels_HWC.permute(2, 0, 1).float().div_(255.0).mul_(2.0).sub_(1.0)


class ImageTransform:
    """Callable: RGB PIL image of any size -> float32 tensor (3, resolution, resolution) in [-1, 1].

    Args:
        resolution: output side length in pixels (>= 1).
        train: random crop (and optional flip) when True; deterministic centre crop when False.
        hflip: flip horizontally with probability 0.5 (training only; VAR's default is off).

    Random draws come from ``generator`` when given (training datasets seed one per sample, see
    :func:`varlib.data.resumable.sample_generator`, so a resumed run replays them), else from torch's global RNG.
    The flip is applied after cropping; since the crop offset is uniform, this gives the same
    distribution as VAR's flip-before-resize.
    """

    def __init__(self, resolution: int, train: bool, hflip: bool = False) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution = resolution
        self.train = train
        self.hflip = hflip
        self.resize_to = resize_target(resolution)

    def crop_box(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the square crop within a resized image of this size."""
        res = self.resolution
        if self.train:
            top = int(torch.randint(0, height - res + 1, (), generator=generator).item())
            left = int(torch.randint(0, width - res + 1, (), generator=generator).item())
        else:
            top = int(round((height - res) / 2.0))
            left = int(round((width - res) / 2.0))
        return left, top, left + res, top + res

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(
                f"ImageTransform expects an RGB PIL image, got mode {image.mode!r}; "
                "load images with varlib.data.load_rgb_image"
            )
        resized = resize_shorter_side(image, self.resize_to)
        cropped = resized.crop(self.crop_box(*resized.size, generator))
        image_CHW = pil_to_unit_range(cropped)
        if self.train and self.hflip and torch.rand((), generator=generator).item() < 0.5:
            image_CHW = image_CHW.flip(-1)
        return image_CHW

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, train={self.train}, "
            f"hflip={self.hflip}, resize_to={self.resize_to})"
        )


class MultiCropTransform:
    """Image -> (crops, 3, R, R): ``crops`` independent random crops of the official training transform."""

    def __init__(self, resolution: int, crops: int):
        self.crop, self.crops = ImageTransform(resolution, train=True), crops

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.crop(image) for _ in range(self.crops)])
