"""Tests for the tokenizer's training losses (LPIPS, PatchGAN, GAN terms) and the weight EMA."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varlib.training.discriminator import PatchDiscriminator
from varlib.training.ema import ModelEMA
from varlib.training.gan import (
    adaptive_gan_weight,
    gan_start_factor,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
)
from varlib.training.perceptual import (
    LPIPS_VGG_HEADS_PATH,
    VGG16_FILENAME,
    VGG16_URL,
    PerceptualLoss,
    default_vgg16_weights_path,
)

# ---------------------------------------------------------------------------------------------- perceptual


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


# ------------------------------------------------------------------------------------------- discriminator


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


# ------------------------------------------------------------------------------------------------------ gan


REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-3.0, 0.0, 1.0])


def test_hinge_losses_on_known_logits() -> None:
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)
    assert hinge_g_loss(FAKE).item() == pytest.approx(-(-3 + 0 + 1) / 3, rel=1e-6)


def test_vanilla_d_loss_on_known_logits() -> None:
    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expected = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)
    bce_real = F.binary_cross_entropy_with_logits(REAL, torch.ones(3))
    bce = 0.5 * (bce_real + F.binary_cross_entropy_with_logits(FAKE, torch.zeros(3)))
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(bce.item(), rel=1e-6)


def test_adaptive_gan_weight_matches_gradient_ratio() -> None:
    # y = W x with x = (1, 2): d(3y)/dW = 3x and d(-0.5y)/dW = -0.5x, so the ratio of norms is 6 (up to eps).
    weight = nn.Parameter(torch.tensor([[0.3, -0.7]]))
    x = torch.tensor([1.0, 2.0])
    y = (weight @ x).sum()
    rec_loss, g_loss = 3 * y, -0.5 * y
    norm_x = math.sqrt(5)
    result = adaptive_gan_weight(rec_loss, g_loss, weight)
    assert result.item() == pytest.approx(3 * norm_x / (0.5 * norm_x + 1e-4), rel=1e-6)
    assert not result.requires_grad
    assert adaptive_gan_weight(rec_loss, g_loss, weight, max_weight=2.0).item() == 2.0
    (rec_loss + g_loss).backward()  # the graph was retained
    assert torch.allclose(weight.grad, 2.5 * x.unsqueeze(0))


def test_adaptive_gan_weight_eps_when_gan_gradient_vanishes() -> None:
    weight = nn.Parameter(torch.tensor([[1.0]]))
    y = (weight * 0.5).sum()
    # ||grad rec|| = 0.5 and ||grad g|| = 0, so the weight is 0.5 / eps.
    assert adaptive_gan_weight(y, 0 * y, weight, eps=1e-2).item() == pytest.approx(50.0, rel=1e-6)
    assert adaptive_gan_weight(y, 0 * y, weight, eps=1e-2, max_weight=10.0).item() == 10.0


def test_gan_start_factor() -> None:
    assert [gan_start_factor(step, 100) for step in (0, 99, 100, 101, 5000)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert gan_start_factor(0, 0) == 1.0


# ------------------------------------------------------------------------------------------------------ ema


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("count", torch.tensor(0))


def _set(model: Scalar, value: float) -> None:
    with torch.no_grad():
        model.value.fill_(value)


def test_ema_matches_closed_form() -> None:
    model, decay = Scalar(), 0.9
    ema = ModelEMA(model, decay=decay)
    values = [1.0, 2.0, 3.0]
    for v in values:
        _set(model, v)
        ema.update(model)
    # e_n = d^n e_0 + (1 - d) sum_k d^(n - k) v_k, with e_0 = 0
    n = len(values)
    expected = (1 - decay) * sum(decay ** (n - k) * v for k, v in enumerate(values, start=1))
    assert ema.shadow_params["value"].item() == pytest.approx(expected, abs=1e-6)
    assert ema.num_updates == 3


def test_ema_warmup_decay() -> None:
    model = Scalar()
    ema = ModelEMA(model, decay=0.999, warmup=True)
    _set(model, 1.0)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    # constant target 1 from e_0 = 0: e_n = 1 - prod(d_k)
    assert ema.shadow_params["value"].item() == pytest.approx(1 - math.prod(decays), abs=1e-6)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999


def test_ema_copies_buffers() -> None:
    model = Scalar()
    ema = ModelEMA(model, decay=0.5)
    model.count.fill_(7)
    ema.update(model)
    assert ema.shadow_buffers["count"].item() == 7
    model.count.fill_(0)
    ema.copy_to(model)
    assert model.count.item() == 7


def test_ema_swap_restores_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 4))  # changes the BatchNorm running statistics
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    original = {k: v.clone() for k, v in model.state_dict().items()}

    with ema.swap(model):
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.shadow_params[name])
            assert not torch.equal(p, original[name])
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])

    with pytest.raises(RuntimeError, match="boom"), ema.swap(model):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])


def test_ema_state_dict_round_trip(tmp_path: Path) -> None:
    model = Scalar()
    ema = ModelEMA(model, decay=0.8, warmup=True)
    _set(model, 2.0)
    ema.update(model)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    restored = ModelEMA(Scalar(), decay=0.1)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.8, True, 2)
    assert torch.equal(restored.shadow_params["value"], ema.shadow_params["value"])
    restored.shadow_params["value"].add_(1)  # loaded tensors are copies
    assert not torch.equal(restored.shadow_params["value"], ema.shadow_params["value"])


def test_ema_keeps_float32_for_low_precision_models() -> None:
    model = Scalar().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.999)
    _set(model, 1.0)
    ema.update(model)
    assert ema.shadow_params["value"].dtype == torch.float32
    assert ema.shadow_params["value"].item() == pytest.approx(0.001, rel=1e-5)


def test_ema_rejects_mismatched_models_and_bad_decay() -> None:
    model = Scalar()
    ema = ModelEMA(model)
    wrapped = nn.ModuleDict({"module": model})  # names gain a "module." prefix, as under DDP
    with pytest.raises(ValueError, match=r"missing 2 names \['count', 'value'\]"):
        ema.update(wrapped)
    bad_state = ema.state_dict() | {"params": {"value": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"expected shape \(\), got \(2,\)"):
        ema.load_state_dict(bad_state)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)
