"""Robust image decoding: any PIL-readable file or byte string to an 8-bit RGB image.

Datasets in the wild contain greyscale, 16-bit, CMYK, palette and transparent images as well as
truncated or corrupt files. `decode_rgb_image` normalises the first group to RGB (transparency is
composited on white) and turns every decoding failure into one exception type, `ImageDecodeError`;
`load_rgb_image` is the never-raising variant that returns None instead.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

WHITE_RGBA = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageDecodeError(ValueError):
    """Raised when a file or byte string cannot be decoded into an image."""


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float greyscale image to 8-bit 'L'.

    PIL's own conversion clips such values at 255, which turns ordinary 16-bit scans white.
    'I;16*' holds 0..65535; 'I' is treated as 16-bit when any value exceeds 255; 'F' is treated
    as [0, 1] when its maximum is at most 1, else as 0..255.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def composite_on_white(image: Image.Image) -> Image.Image:
    """Alpha-composite an image with transparency over an opaque white background; returns RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE_RGBA)
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Transparent pixels (alpha channels, and palette/greyscale images with a 'transparency'
    entry) are composited on white; greyscale is replicated to three channels; CMYK, YCbCr,
    LAB and HSV use PIL's colour conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_grey(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return composite_on_white(image)
    return image.convert("RGB")


def decode_rgb_image(source: ImageSource) -> Image.Image:
    """Fully decode an image file (path, raw bytes or binary file object) into an RGB PIL image.

    Output: an in-memory `PIL.Image` of mode 'RGB' (width and height as stored in the file).
    Raises `ImageDecodeError` (a ValueError) naming the cause for anything unreadable: missing
    file, unknown format, truncated or corrupt data, decompression bombs.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(source))
            image.load()
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as file:
                image = Image.open(file)
                image.load()
        else:
            image = Image.open(source)
            image.load()
        return to_rgb(image)
    # Third-party decoders raise many exception types (OSError, SyntaxError, struct.error,
    # IndexError, ...) on malformed data; all of them mean "this file is unusable".
    except Exception as error:
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error


def load_rgb_image(source: ImageSource) -> Image.Image | None:
    """Like `decode_rgb_image`, but returns None instead of raising on unreadable data."""
    try:
        return decode_rgb_image(source)
    except ImageDecodeError:
        return None
