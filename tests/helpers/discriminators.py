"""A discriminator other than the PatchGAN, to swap in through ``model.discriminator._target_``."""

import torch.nn.functional as F
from torch import Tensor, nn


class GlobalDiscriminator(nn.Module):
    """One 3x3 conv, a global average and a linear head: images (B,C,H,W) -> one logit per image (B,1,1,1)."""

    def __init__(self, in_channels: int, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.head = nn.Linear(width, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.head(F.leaky_relu(self.conv(x_BCHW), 0.2).mean((2, 3)))[:, :, None, None]
