"""varlib.training.gan: the GAN loss terms, the adaptive weight and the start factor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varlib.training.gan import (
    adaptive_gan_weight,
    gan_start_factor,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
)


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
