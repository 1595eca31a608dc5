"""Reconstruction quality of the tokenizer: PSNR, SSIM and an optional perceptual distance (e.g. LPIPS).

``psnr`` is a plain function. ``ReconstructionMetrics`` is a torchmetrics ``MetricCollection`` for images in
[-1, 1] (the tokenizer's range): PSNR and SSIM are computed on images mapped to [0, 1] (data range 1), the
perceptual module gets the [-1, 1] images (what ``lpips.LPIPS`` expects). Values outside [-1, 1], e.g. from
an unclamped decoder, are clamped first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


def _check_pair(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> None:
    if x_BCHW.shape != y_BCHW.shape or x_BCHW.ndim != 4:
        raise ValueError(
            f"expected two image batches of one shape (B,C,H,W), got {tuple(x_BCHW.shape)} and {tuple(y_BCHW.shape)}"
        )


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), with the MSE taken per image.

    Args: two batches (B,C,H,W) and the value span (2.0 for [-1,1], 1.0 for [0,1], 255 for uint8).
    Returns: (per-image PSNR (B,), their mean ()); identical images give +inf.
    """
    _check_pair(x_BCHW, y_BCHW)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse_B = (x_BCHW.double() - y_BCHW.double()).pow(2).flatten(1).mean(dim=1)
    psnr_B = 10.0 * torch.log10(data_range**2 / mse_B)
    return psnr_B, psnr_B.mean()


class MeanPerceptualDistance(Metric):
    """Mean over images of ``perceptual(x, y)``, for any perceptual-distance callable (e.g. ``lpips.LPIPS``).

    ``update(x_BCHW, y_BCHW)`` takes images in [0, 1] and passes them to ``perceptual`` rescaled to [-1, 1];
    ``perceptual`` must return one distance per image (shape (B,) or (B,1,1,1)).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self.perceptual = perceptual.eval() if isinstance(perceptual, nn.Module) else perceptual
        self.add_state("distance_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> MeanPerceptualDistance:
        """The perceptual network stays in eval mode (LPIPS has dropout)."""
        super().train(mode)
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.eval()
        return self

    def update(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> None:
        _check_pair(x_BCHW, y_BCHW)
        with torch.no_grad():
            distances = self.perceptual(x_BCHW * 2 - 1, y_BCHW * 2 - 1)
        if distances.numel() != x_BCHW.shape[0]:
            raise ValueError(
                f"the perceptual module must return one distance per image ({x_BCHW.shape[0]}), "
                f"got shape {tuple(distances.shape)}"
            )
        self.distance_sum += distances.double().sum()
        self.num_images += x_BCHW.shape[0]

    def compute(self) -> torch.Tensor:
        return self.distance_sum / self.num_images


class ReconstructionMetrics(MetricCollection):
    """PSNR, SSIM and optionally a perceptual distance of reconstructions vs targets, both in [-1, 1] (B,C,H,W).

    Args:
        perceptual: optional callable (x, y) -> per-image distance on [-1, 1] images, logged as ``lpips``.
        prefix: prepended to the result keys, e.g. ``"val/"``.
    ``update(recon, target)`` / ``forward(recon, target)`` / ``compute()`` return ``{"psnr", "ssim"[, "lpips"]}``;
    PSNR is the mean of per-image values in dB.
    """

    def __init__(
        self, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, prefix: str | None = None
    ) -> None:
        metrics: dict[str, Metric] = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        }
        if perceptual is not None:
            metrics["lpips"] = MeanPerceptualDistance(perceptual)
        super().__init__(metrics, prefix=prefix, compute_groups=False)

    @staticmethod
    def _to_unit_range(recon_BCHW: torch.Tensor, target_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(recon_BCHW, target_BCHW)
        return (recon_BCHW.float().clamp(-1, 1) + 1) / 2, (target_BCHW.float().clamp(-1, 1) + 1) / 2

    def update(self, recon_BCHW: torch.Tensor, target_BCHW: torch.Tensor) -> None:
        super().update(*self._to_unit_range(recon_BCHW, target_BCHW))

    def forward(self, recon_BCHW: torch.Tensor, target_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().forward(*self._to_unit_range(recon_BCHW, target_BCHW))
