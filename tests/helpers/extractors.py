"""A tiny random feature extractor standing in for Inception in tests (also in subprocess runs), and one that can
kill its process."""

import os
import signal

import torch
from torch import nn


class TinyExtractor(nn.Module):
    """A FeatureExtractor: uint8 (B,3,H,W) -> (features (B,8), logits (B,5)); the same weights every time."""

    def __init__(self) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        torch.random.set_rng_state(generator_state)

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features_BD = self.norm(self.conv(images_BCHW.float() / 127.5 - 1)).relu().mean(dim=(2, 3))
        return features_BD, self.head(features_BD)


def random_uint8_images(num: int, seed: int, size: int = 16) -> torch.Tensor:
    """``num`` seeded random uint8 images (num, 3, size, size): inputs for the tiny extractor."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, size, size), generator=generator, dtype=torch.uint8)


class KillableExtractor(TinyExtractor):
    """The tiny extractor that SIGKILLs its own process on its call number n + 1 when the environment holds
    ``KILL_EXTRACTOR=rank:n`` for this process's RANK: a hard stop in the middle of an evaluation run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rank, _, after = os.environ.get("KILL_EXTRACTOR", "-1:0").partition(":")
        if int(rank) == int(os.environ.get("RANK", 0)) and self.calls >= int(after):
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1
        return super().forward(images_BCHW)
