"""varlib.training.discriminator: the PatchGAN discriminator's shapes, layout and init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varlib.training.discriminator import PatchDiscriminator


@pytest.mark.parametrize(("size", "n_layers", "expected_side"), [(64, 3, 6), (24, 3, 1), (32, 2, 6), (48, 1, 22)])
def test_discriminator_output_shape(size: int, n_layers: int, expected_side: int) -> None:
    disc = PatchDiscriminator(base_channels=8, n_layers=n_layers)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, expected_side, expected_side)


def test_discriminator_rejects_too_small_or_wrong_channels() -> None:
    disc = PatchDiscriminator(base_channels=8, n_layers=3)
    assert disc.min_input_size == 24
    with pytest.raises(ValueError, match="H, W >= 24"):
        disc(torch.randn(1, 3, 23, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=0)


def test_discriminator_layout_and_norms() -> None:
    disc = PatchDiscriminator(base_channels=4, n_layers=5, norm="group")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]  # doubling capped at 8x
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, False, False, True]
    assert sum(isinstance(m, nn.GroupNorm) for m in disc.modules()) == 5
    plain = PatchDiscriminator(base_channels=4, n_layers=2, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_discriminator_dcgan_init() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator()  # default batch norm, 64 base channels
    big_conv = disc.layers[5]  # 256 x 128 x 4 x 4 weights
    assert isinstance(big_conv, nn.Conv2d) and big_conv.weight.numel() == 256 * 128 * 16
    assert abs(big_conv.weight.std().item() - 0.02) < 0.001
    assert abs(big_conv.weight.mean().item()) < 0.001
    norm = disc.layers[9]
    assert isinstance(norm, nn.BatchNorm2d) and norm.num_features == 512
    assert abs(norm.weight.mean().item() - 1.0) < 0.005
    assert torch.equal(norm.bias, torch.zeros(512))
    assert torch.equal(disc.layers[0].bias, torch.zeros(64))
