"""varlib.evaluation.colour, the colour test of make demo-text: solid colours of exact hues, white and grey
backgrounds, and the real emoji that the colour prompts name."""

from __future__ import annotations

import colorsys

import pytest
import torch

from varlib.evaluation.colour import COLOURS, HUE_RANGES, colour_share, dominant_colours, hsv
from varlib.pipelines.text_demo import captioned_emoji, colour_prompts, emoji_named


def solid(hue_degrees: float, saturation: float = 0.8, value: float = 0.9, size: int = 8) -> torch.Tensor:
    """A (1,3,size,size) image of one HSV colour."""
    rgb = colorsys.hsv_to_rgb(hue_degrees / 360.0, saturation, value)
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_hue_matches_colorsys_on_exact_colours():
    for hue in (0.0, 14.0, 34.0, 43.0, 97.0, 206.0, 263.0, 353.0):
        h, s, v = hsv(solid(hue))
        assert h.unique().item() == pytest.approx(hue, abs=1e-3)
        assert s.unique().item() == pytest.approx(0.8, abs=1e-5) and v.unique().item() == pytest.approx(0.9)


@pytest.mark.parametrize("colour", COLOURS)
def test_a_solid_image_inside_a_range_is_that_colour(colour):
    first, last = HUE_RANGES[colour]
    width = (last - first) % 360.0
    for hue in (first + 0.5, first + width / 2, first + width - 0.5):
        assert dominant_colours(solid(hue % 360.0)) == [colour], hue


def test_white_grey_and_black_pixels_count_for_no_colour():
    background = torch.ones(1, 3, 8, 8)
    background[..., :3, :] = 0.5
    background[..., 3:4, :] = 0.05
    assert dominant_colours(background) == [None]
    heart = background.clone()
    heart[..., 6:, 6:] = solid(206.0, size=2)  # a few blue pixels on a mostly white image decide
    assert dominant_colours(heart) == ["blue"]


def test_the_colour_with_most_pixels_wins_and_the_share_counts_matches():
    mixed = solid(353.0)
    mixed[..., :3, :] = solid(97.0)[..., :3, :]  # 24 green, 40 red pixels
    images = torch.cat([mixed, solid(43.0), solid(263.0)])
    assert dominant_colours(images) == ["red", "yellow", "purple"]
    assert colour_share(images, ["red", "yellow", "blue"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"expected colours among .*got \['pink'\]"):
        colour_share(images, ["red", "yellow", "pink"])
    with pytest.raises(ValueError, match="one colour per image, got 2 colours and 3 images"):
        colour_share(images, ["red", "yellow"])


def test_the_real_emoji_of_every_colour_prompt_show_their_colour():
    pairs = colour_prompts()
    assert len(pairs) == 21  # 7 colours x heart, circle, square
    images = emoji_named(captioned_emoji(32), [prompt for prompt, _ in pairs])
    assert images.shape == (21, 3, 32, 32)
    assert colour_share(images, [colour for _, colour in pairs]) == 1.0  # measured: every one
