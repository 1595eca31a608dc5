"""varlib.evaluation.image_quality: PSNR and the reconstruction metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from varlib.evaluation import (
    ReconstructionMetrics,
    psnr,
)


def test_psnr_closed_form_per_image():
    target = torch.zeros(3, 3, 8, 8)
    offsets = torch.tensor([0.1, 0.5, 0.0])
    recon = target + offsets[:, None, None, None]
    per_image, mean = psnr(recon, target, data_range=2.0)
    expected = 10 * torch.log10(4.0 / offsets[:2].double() ** 2)
    torch.testing.assert_close(per_image[:2], expected)
    assert math.isinf(per_image[2].item())
    assert math.isinf(mean.item())
    with pytest.raises(ValueError, match="one shape"):
        psnr(recon, target[:2], data_range=2.0)


def test_reconstruction_metrics_on_signed_images():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    recon = (target + 0.1 * torch.randn(4, 3, 16, 16, generator=generator)).clamp(-1, 1)

    def mean_abs(x, y):  # checks it receives [-1,1] images
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5
        return (x - y).abs().mean(dim=(1, 2, 3))

    metrics = ReconstructionMetrics(perceptual=mean_abs, prefix="val/")
    metrics.update(recon[:2], target[:2])
    metrics.update(recon[2:], target[2:])
    results = metrics.compute()
    assert set(results) == {"val/psnr", "val/ssim", "val/lpips"}
    assert results["val/psnr"].item() == pytest.approx(psnr(recon, target, data_range=2.0)[1].item(), rel=1e-5)
    assert results["val/lpips"].item() == pytest.approx((recon - target).abs().mean().item(), rel=1e-5)
    # SSIM of the whole set (two updates) on the [0, 1] images with data range 1, as torchmetrics computes it
    want_ssim = structural_similarity_index_measure((recon + 1) / 2, (target + 1) / 2, data_range=1.0)
    assert results["val/ssim"].item() == pytest.approx(want_ssim.item(), abs=1e-5)
    assert 0.3 < want_ssim.item() < 0.99  # noisy, not identical: the comparison is not trivially 1

    identical = ReconstructionMetrics()
    assert identical(target, target)["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one distance per image"):
        ReconstructionMetrics(perceptual=lambda x, y: (x - y).abs())(recon, target)


def test_reconstruction_metrics_accept_lpips_module_and_keep_it_in_eval():
    import lpips

    torch.manual_seed(0)
    perceptual = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)  # random, no download
    metrics = ReconstructionMetrics(perceptual=perceptual)
    metrics.train()
    assert not perceptual.training  # LPIPS has dropout layers
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert metrics(images, images)["lpips"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics(images, images.flip(0))["lpips"].item() > 0
