"""Which colour an image shows: the colour test of ``make demo-text`` ("red heart", "blue circle", ...).

An image's colour is the named hue range (:data:`HUE_RANGES`, degrees) holding most of its coloured pixels, those
with HSV saturation >= :data:`MIN_SATURATION` and value >= :data:`MIN_VALUE` (white, grey and black pixels, the
emoji's background and outlines, count for none). The ranges sit between the hues of Twemoji's coloured hearts,
circles and squares, which share one palette: red 353, brown 14, orange 34, yellow 43, green 97, blue 206, purple
263 degrees. Brown is Twemoji's dark red-orange, told apart from red and orange by hue alone.
"""

from __future__ import annotations

import torch

#: colour -> (first, last) hue in degrees, last excluded; red's wraps around 0 (first > last)
HUE_RANGES = {
    "red": (330.0, 8.0),
    "brown": (8.0, 24.0),
    "orange": (24.0, 39.0),
    "yellow": (39.0, 70.0),
    "green": (70.0, 170.0),
    "blue": (170.0, 250.0),
    "purple": (250.0, 330.0),
}
COLOURS = tuple(HUE_RANGES)
MIN_SATURATION = 0.25
MIN_VALUE = 0.2


def hsv(images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float RGB images (B,3,H,W) in [0,1] -> hue in degrees [0, 360), saturation and value, each (B,H,W)."""
    if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(f"expected RGB images (B,3,H,W) in [0,1], got shape {tuple(images_BCHW.shape)}")
    rgb = images_BCHW.float().clamp(0, 1)
    value, brightest = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    r, g, b = rgb.unbind(1)
    safe = chroma.clamp_min(1e-8)
    # The sector of the brightest channel, 60 degrees per unit.
    hue = torch.where(brightest == 0, ((g - b) / safe) % 6, torch.where(brightest == 1, (b - r) / safe + 2,
                                                                         (r - g) / safe + 4)) * 60.0
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-8), torch.zeros_like(value))
    return hue % 360.0, saturation, value


def colour_counts(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Coloured pixels per image and colour: (B, len(COLOURS)), in the order of :data:`COLOURS`."""
    hue, saturation, value = hsv(images_BCHW)
    coloured = (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)
    counts = []
    for first, last in HUE_RANGES.values():
        inside = (hue >= first) & (hue < last) if first < last else (hue >= first) | (hue < last)
        counts.append((inside & coloured).flatten(1).sum(dim=1))
    return torch.stack(counts, dim=1)


def dominant_colours(images_BCHW: torch.Tensor) -> list[str | None]:
    """Each image's colour (a key of :data:`HUE_RANGES`), None for an image without coloured pixels."""
    counts = colour_counts(images_BCHW)
    return [COLOURS[int(row.argmax())] if row.sum() > 0 else None for row in counts]


def colour_share(images_BCHW: torch.Tensor, colours: list[str]) -> float:
    """The share of images whose dominant colour is the one named for it (one name per image)."""
    if len(colours) != images_BCHW.shape[0]:
        raise ValueError(f"expected one colour per image, got {len(colours)} colours and {images_BCHW.shape[0]} "
                         f"images")
    unknown = sorted(set(colours) - set(COLOURS))
    if unknown:
        raise ValueError(f"expected colours among {list(COLOURS)}, got {unknown}")
    found = dominant_colours(images_BCHW)
    return sum(f == c for f, c in zip(found, colours)) / len(colours)
