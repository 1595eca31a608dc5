"""Patch schedules (the side lengths of the K token maps) and the official phi-sharing index rule."""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Official 256px schedule: 10 scales, 16x16 latent, L = 680 tokens.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
#: Official 512px schedule (same tokenizer, 32x32 latent), L = 2240 tokens.
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
#: Defined by the official arguments for 1024px; no checkpoint uses it.
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

PRESETS = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512, 1024: PATCH_NUMS_1024}


def validate_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Returns the schedule as a tuple; raises ValueError unless it is strictly increasing positive ints."""
    pns = tuple(int(p) for p in patch_nums)
    if not pns:
        raise ValueError("patch_nums must name at least one scale, got an empty schedule")
    if pns[0] < 1 or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ValueError(f"patch_nums must be strictly increasing positive integers, got {pns}")
    return pns


def sequence_length(patch_nums: Sequence[int]) -> int:
    """L = sum of pn^2 over the scales."""
    return sum(p * p for p in patch_nums)


def scale_slices(patch_nums: Sequence[int]) -> list[slice]:
    """The token range of each scale inside the flattened length-L sequence."""
    slices, start = [], 0
    for pn in patch_nums:
        slices.append(slice(start, start + pn * pn))
        start += pn * pn
    return slices


def phi_index_per_scale(num_scales: int, num_phi: int) -> list[int]:
    """Which of the ``num_phi`` shared phi convolutions refines each scale (official rule).

    Scale k sits at ratio k/(K-1) in [0, 1]; it uses the phi whose tick is nearest. The ticks are
    ``linspace(1/(3n), 1 - 1/(3n), n)`` for n == 4 and ``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise.
    For the official K=10, n=4 this gives [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]: scales 2 and 7 are exact ties
    in real arithmetic, and float64 rounding breaks them the official way, so the ticks are computed
    with the same float64 expression.
    """
    if num_phi < 1:
        raise ValueError(f"num_phi must be >= 1, got {num_phi}")
    if num_phi == 1:
        return [0] * num_scales
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    ratios = [k / (num_scales - 1) if num_scales > 1 else 0.0 for k in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - r))) for r in ratios]
