"""varlib.training.perceptual: the LPIPS loss, its weight files and input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from varlib.training.perceptual import (
    LPIPS_VGG_HEADS_PATH,
    VGG16_FILENAME,
    VGG16_URL,
    PerceptualLoss,
    default_vgg16_weights_path,
)


def _trunk_convs(loss: PerceptualLoss) -> dict[str, nn.Conv2d]:
    """lpips keeps torchvision's index of each VGG layer as its name inside net.slice1..slice5."""
    net = loss.lpips.net
    slices = [net.slice1, net.slice2, net.slice3, net.slice4, net.slice5]
    return {name: m for s in slices for name, m in s.named_children() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def random_loss(tmp_path_factory: pytest.TempPathFactory) -> PerceptualLoss:
    missing = tmp_path_factory.mktemp("empty") / VGG16_FILENAME
    with pytest.warns(UserWarning, match="not meaningful"):
        return PerceptualLoss(vgg_weights_path=missing, allow_random_backbone=True)


@pytest.fixture(scope="module")
def fake_vgg_file(tmp_path_factory: pytest.TempPathFactory, random_loss: PerceptualLoss) -> Path:
    """A torchvision-style vgg16 state dict ('features.<i>.weight', ...) with fresh random values."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, conv in _trunk_convs(random_loss).items():
        for param_name, param in conv.named_parameters():
            state[f"features.{index}.{param_name}"] = 0.05 * torch.randn(param.shape, generator=generator)
    state["classifier.6.bias"] = torch.zeros(1000)  # the real file also holds the classifier; it must be ignored
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILENAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def pretrained_loss(fake_vgg_file: Path) -> PerceptualLoss:
    return PerceptualLoss(vgg_weights_path=fake_vgg_file)


def _assert_trunk_matches_file(loss: PerceptualLoss, path: Path) -> None:
    state = torch.load(path, weights_only=True)
    convs = _trunk_convs(loss)
    assert len(convs) == 13  # VGG16 has 13 conv layers
    for index, conv in convs.items():
        assert torch.equal(conv.weight, state[f"features.{index}.weight"])
        assert torch.equal(conv.bias, state[f"features.{index}.bias"])


def test_pretrained_path_loads_trunk_and_package_heads(pretrained_loss: PerceptualLoss, fake_vgg_file: Path) -> None:
    assert pretrained_loss.pretrained_backbone
    _assert_trunk_matches_file(pretrained_loss, fake_vgg_file)
    heads = torch.load(LPIPS_VGG_HEADS_PATH, map_location="cpu", weights_only=True)
    for index in range(5):
        assert torch.equal(pretrained_loss.lpips.lins[index].model[1].weight, heads[f"lin{index}.model.1.weight"])


def test_torch_home_cache_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_vgg_file: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / VGG16_FILENAME
    assert default_vgg16_weights_path() == cached
    cached.parent.mkdir(parents=True)
    cached.write_bytes(fake_vgg_file.read_bytes())
    loss = PerceptualLoss()
    assert loss.pretrained_backbone
    _assert_trunk_matches_file(loss, cached)


def test_missing_weights_error_names_file_and_url(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / VGG16_FILENAME
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))) as info:
        PerceptualLoss(vgg_weights_path=path)
    assert VGG16_URL in str(info.value)


def test_unreadable_or_wrong_weights_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read VGG16 weights"):
        PerceptualLoss(vgg_weights_path=corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not hold torchvision's vgg16"):
        PerceptualLoss(vgg_weights_path=wrong)


@pytest.mark.parametrize("which", ["random_loss", "pretrained_loss"])
def test_lpips_is_zero_on_identical_images_and_positive_otherwise(which: str, request: pytest.FixtureRequest) -> None:
    loss = request.getfixturevalue(which)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    assert torch.equal(loss(x, x, reduction="none"), torch.zeros(2))
    per_sample = loss(x, y, reduction="none")
    assert per_sample.shape == (2,) and (per_sample > 0).all()
    assert torch.allclose(loss(x, y), per_sample.mean())


def test_perceptual_loss_is_frozen_and_stays_in_eval(random_loss: PerceptualLoss) -> None:
    assert not any(p.requires_grad for p in random_loss.parameters())
    random_loss.train()
    assert not any(m.training for m in random_loss.modules())
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_()
    random_loss(x, torch.zeros(1, 3, 16, 16)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_perceptual_loss_rejects_bad_inputs(random_loss: PerceptualLoss) -> None:
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        random_loss(x, torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        random_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="H, W >= 16"):
        random_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        random_loss(x, x, reduction="sum")
