"""PatchGAN discriminator: a small conv net that scores overlapping image patches as real or fake."""

from __future__ import annotations

import math

from torch import Tensor, nn

NORMS = ("batch", "group", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # Up to 32 groups, as many as divide the channel count.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (the pix2pix / VQGAN design).

    Layout: conv 4x4/2 + LeakyReLU(0.2); ``n_layers - 1`` blocks of conv 4x4/2 + norm + LeakyReLU that double
    the channels (capped at 8x ``base_channels``); one such block with stride 1; a final 1-channel conv 4x4/1.
    Weights use the DCGAN initialisation: convs N(0, 0.02), norm scales N(1, 0.02), biases 0.

    Args:
        in_channels: image channels.
        base_channels: channels of the first conv.
        n_layers: number of stride-2 convs; each output logit sees a larger patch as it grows.
        norm: ``"batch"``, ``"group"`` or ``"none"``.

    Input (B, in_channels, H, W) with H, W >= ``min_input_size`` (= 3 * 2**n_layers, e.g. 24 for n_layers=3).
    Output (B, 1, h, w) real/fake logits with h = H // 2**n_layers - 2 (64 px -> 6x6, 256 px -> 30x30).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if min(in_channels, base_channels, n_layers) < 1:
            raise ValueError(
                "in_channels, base_channels and n_layers must be >= 1, got "
                f"{in_channels}, {base_channels}, {n_layers}"
            )
        self.in_channels = in_channels
        self.n_layers = n_layers
        use_bias = norm == "none"  # a norm layer's shift makes a conv bias redundant

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for index in range(1, n_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=use_bias),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    @property
    def min_input_size(self) -> int:
        """Smallest image side giving a 1x1 logit map: the two stride-1 convs each remove one pixel."""
        return 3 * 2**self.n_layers

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """Patch logits (B, 1, h, w) for images (B, in_channels, H, W); see the class docstring for h, w."""
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != self.in_channels or min(x_BCHW.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"expected (B, {self.in_channels}, H, W) with H, W >= {self.min_input_size} "
                f"for n_layers={self.n_layers}, got {tuple(x_BCHW.shape)}"
            )
        return self.layers(x_BCHW)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
