"""The multi-scale residual quantizer of VAR: one shared codebook, K token maps of growing size.

Shapes: B batch, C = Cvae latent channels, H = W = the latent side (= the last patch number),
pn the side of one token map, V the codebook size, K the number of scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from varlib.models.patch_schedules import phi_index_per_scale, validate_patch_nums


class Phi(nn.Conv2d):
    """The residual refiner applied to each up-sampled code map: ``(1 - r) * h + r * conv3x3(h)``."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


class PhiSet(nn.Module):
    """``num_phi`` phi convolutions shared across the scales by the official nearest-tick rule.

    The state-dict layout matches the official ``PhiPartiallyShared`` (``qresi_ls.{i}``).
    """

    def __init__(self, channels: int, resi_ratio: float, num_phi: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(num_phi))
        self.index_per_scale = phi_index_per_scale(num_scales, num_phi)

    def for_scale(self, si: int) -> Phi:
        return self.qresi_ls[self.index_per_scale[si]]


@dataclass
class QuantizerOutput:
    """What the training forward of :class:`MultiScaleQuantizer` returns.

    f_hat_st: (B,C,H,W) the reconstruction with a straight-through gradient to the encoder.
    vq_loss: () mean over scales of ``beta * ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2``.
    tokens: list of K LongTensors (B, pn*pn).
    usage: (K,) fraction of the codebook hit at each scale in this batch.
    perplexity: (K,) exp(entropy) of the code histogram of each scale in this batch.
    """

    f_hat_st: torch.Tensor
    vq_loss: torch.Tensor
    tokens: list[torch.Tensor]
    usage: torch.Tensor
    perplexity: torch.Tensor


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over a schedule of token maps sharing one codebook of ``vocab_size`` codes.

    Args:
        vocab_size: V, the number of codes.
        channels: Cvae, the code dimension.
        patch_nums: the side of each token map; the last one must equal the latent side.
        beta: commitment weight of the VQ loss.
        resi_ratio: r in ``phi(h) = (1 - r) h + r conv(h)``.
        num_phi: the number of phi convolutions shared across scales (official: 4).
    """

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        resi_ratio: float = 0.5,
        num_phi: int = 4,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.channels = channels
        self.patch_nums = validate_patch_nums(patch_nums)
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, channels)
        self.quant_resi = PhiSet(channels, resi_ratio, num_phi, len(self.patch_nums))
        # Per-scale EMA of code hits; kept under the official name so official checkpoints load strictly.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=False)

    # -- building blocks -------------------------------------------------------------------------

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code in L2 for each row of ``z_NC`` (N,C) -> (N,).

        Computed as ``|z|^2 + |e|^2 - 2 z.e`` in fp32, the official formula, so near-ties break the same way.
        """
        codebook_VC = self.embedding.weight.detach().float()
        dist_NV = z_NC.float().square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)
        dist_NV.addmm_(z_NC.float(), codebook_VC.T, alpha=-2, beta=1)
        return dist_NV.argmin(dim=1)

    def embed(self, tokens_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Code vectors of one token map: (B, pn*pn) -> (B, C, pn, pn)."""
        return rearrange(self.embedding(tokens_Bl), "B (h w) C -> B C h w", h=pn)

    def upsampled_residual(self, h_BCpp: torch.Tensor, si: int, patch_nums: Sequence[int]) -> torch.Tensor:
        """phi_k(bicubic(h -> H x W)); the last scale is already full size and is not interpolated."""
        side = patch_nums[-1]
        if si != len(patch_nums) - 1:
            h_BCpp = F.interpolate(h_BCpp, size=(side, side), mode="bicubic")
        return self.quant_resi.for_scale(si)(h_BCpp)

    def _schedule(self, patch_nums: Sequence[int] | None, side: int | None = None) -> tuple[int, ...]:
        pns = self.patch_nums if patch_nums is None else validate_patch_nums(patch_nums)
        if len(pns) != len(self.patch_nums):
            raise ValueError(
                f"this quantizer has {len(self.patch_nums)} scales (phi sharing is fixed per scale count), "
                f"got a schedule of {len(pns)}: {pns}"
            )
        if side is not None and pns[-1] != side:
            raise ValueError(f"the last patch number must equal the latent side {side}, got schedule {pns}")
        return pns

    # -- Algorithm 1: multi-scale residual quantization ---------------------------------------

    @torch.no_grad()
    def f_to_tokens(
        self, f_BChw: torch.Tensor, patch_nums: Sequence[int] | None = None, return_fhat: bool = False
    ) -> list[torch.Tensor]:
        """Algorithm 1 of the paper (multi-scale VQVAE encoding), from the latent f to K token maps.

        At scale k: quantize area(f_rest -> pn_k), up-sample the codes bicubically to H x W, refine with
        phi_k, then add to f_hat and subtract from f_rest.

        Args:
            f_BChw: (B,C,H,W) latent (``quant_conv(encoder(img))``).
        Returns:
            K LongTensors (B, pn*pn) in row-major (h, w) order, or with ``return_fhat`` the K cumulative
            reconstructions f_hat after each scale, each (B,C,H,W).
        """
        B, C, H, W = f_BChw.shape
        pns = self._schedule(patch_nums, H)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        outputs = []
        for si, pn in enumerate(pns):
            z_BCpp = f_rest if si == len(pns) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            tokens_N = self.nearest_code(rearrange(z_BCpp, "B C h w -> (B h w) C"))
            tokens_Bl = tokens_N.view(B, pn * pn)
            h_BChw = self.upsampled_residual(self.embed(tokens_Bl, pn).contiguous(), si, pns)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            outputs.append(f_hat.clone() if return_fhat else tokens_Bl)
        return outputs

    # -- Algorithm 2: reconstruction from token maps -------------------------------------------

    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Algorithm 2 of the paper up to the decoder: f_hat = sum_k phi_k(bicubic(E[tokens_k])).

        Args:
            tokens: K LongTensors (B, pn_k^2).
        Returns:
            (B,C,H,W) f_hat.
        """
        pns = self._schedule(patch_nums)
        self._check_tokens(tokens, pns)
        side = pns[-1]
        f_hat = self.embedding.weight.new_zeros(tokens[0].shape[0], self.channels, side, side)
        for si, (tokens_Bl, pn) in enumerate(zip(tokens, pns)):
            f_hat.add_(self.upsampled_residual(self.embed(tokens_Bl, pn), si, pns))
        return f_hat

    @torch.no_grad()
    def teacher_forcing_input(
        self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The transformer's input for scales 1..K-1 given the ground-truth token maps.

        The input of scale k+1 is the cumulative reconstruction after scales 0..k, area-downsampled to
        pn_{k+1} x pn_{k+1} and flattened row-major (not the embedding of the previous tokens).

        Args:
            tokens: K LongTensors (B, pn_k^2).
        Returns:
            (B, L - 1, C) with L = sum pn_k^2; scale 0's input is the class token, built by the transformer.
            No gradient flows back to the codebook (the tokenizer is frozen while VAR trains).
        """
        pns = self._schedule(patch_nums)
        self._check_tokens(tokens, pns)
        B, side = tokens[0].shape[0], pns[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.channels, side, side, dtype=torch.float32)
        next_inputs = []
        for si in range(len(pns) - 1):
            f_hat, next_BCpp = self.accumulate(f_hat, self.embed(tokens[si], pns[si]), si, pns)
            next_inputs.append(rearrange(next_BCpp, "B C h w -> B (h w) C"))
        if not next_inputs:
            return f_hat.new_zeros(B, 0, self.channels)
        return torch.cat(next_inputs, dim=1)

    def accumulate(
        self, f_hat: torch.Tensor, h_BCpp: torch.Tensor, si: int, patch_nums: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds scale ``si``'s refined codes to f_hat in place; also returns the next scale's input.

        Returns:
            (f_hat, next) where next = area(f_hat -> pn_{si+1}) (B,C,pn,pn), or f_hat itself after the last scale.
        """
        f_hat.add_(self.upsampled_residual(h_BCpp, si, patch_nums))
        if si == len(patch_nums) - 1:
            return f_hat, f_hat
        pn_next = patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    # -- training forward ----------------------------------------------------------------------

    def forward(self, f_BChw: torch.Tensor, patch_nums: Sequence[int] | None = None) -> QuantizerOutput:
        """Quantizes f at every scale with the VQ loss and a straight-through estimator (run in fp32)."""
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f = f_BChw.float()
            B, C, H, W = f.shape
            pns = self._schedule(patch_nums, H)
            f_detached = f.detach()
            f_rest = f_detached.clone()
            f_hat = torch.zeros_like(f)
            vq_loss = f.new_zeros(())
            tokens, usage, perplexity = [], [], []
            for si, pn in enumerate(pns):
                z_BCpp = f_rest if si == len(pns) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
                tokens_N = self.nearest_code(rearrange(z_BCpp.detach(), "B C h w -> (B h w) C"))
                hits_V = tokens_N.bincount(minlength=self.vocab_size).float()
                self._track_hits(si, hits_V)
                probs_V = hits_V / hits_V.sum()
                usage.append((hits_V > 0).float().mean())
                perplexity.append(torch.exp(-(probs_V * probs_V.clamp_min(1e-10).log()).sum()))
                tokens_Bl = tokens_N.view(B, pn * pn)
                h_BChw = self.upsampled_residual(self.embed(tokens_Bl, pn).contiguous(), si, pns)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
                tokens.append(tokens_Bl)
            vq_loss = vq_loss / len(pns)
            f_hat_st = (f_hat.detach() - f_detached).add_(f)
        return QuantizerOutput(f_hat_st, vq_loss, tokens, torch.stack(usage), torch.stack(perplexity))

    @torch.no_grad()
    def _track_hits(self, si: int, hits_V: torch.Tensor) -> None:
        if not self.training:
            return
        if self.num_updates == 0:
            self.ema_vocab_hit_SV[si].copy_(hits_V)
        else:
            momentum = 0.9 if self.num_updates < 100 else 0.99
            self.ema_vocab_hit_SV[si].mul_(momentum).add_(hits_V, alpha=1 - momentum)
        if si == len(self.patch_nums) - 1:
            self.num_updates += 1

    # -- codebook health -------------------------------------------------------------------------

    @torch.no_grad()
    def restart_dead_codes(self, f_BChw: torch.Tensor, min_hits: float = 1e-3) -> int:
        """Re-seeds codes whose EMA hit count at every scale is below ``min_hits`` from random latent vectors.

        Args:
            f_BChw: (B,C,H,W) latents of a recent batch; their vectors are the new codes (with small noise).
        Returns:
            How many codes were restarted.
        """
        dead_V = (self.ema_vocab_hit_SV < min_hits).all(dim=0)
        num_dead = int(dead_V.sum())
        if num_dead == 0:
            return 0
        vectors_NC = rearrange(f_BChw.detach().float(), "B C h w -> (B h w) C")
        picks = torch.randint(0, vectors_NC.shape[0], (num_dead,), device=vectors_NC.device)
        noise = torch.randn_like(vectors_NC[picks]) * vectors_NC.std() * 0.01
        self.embedding.weight.data[dead_V] = (vectors_NC[picks] + noise).to(self.embedding.weight.dtype)
        self.ema_vocab_hit_SV[:, dead_V] = self.ema_vocab_hit_SV.mean()
        return num_dead

    def _check_tokens(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> None:
        if len(tokens) != len(patch_nums):
            raise ValueError(f"expected {len(patch_nums)} token maps for schedule {tuple(patch_nums)}, got {len(tokens)}")
        for si, (t, pn) in enumerate(zip(tokens, patch_nums)):
            if t.ndim != 2 or t.shape[1] != pn * pn:
                raise ValueError(f"token map {si} must have shape (B, {pn * pn}), got {tuple(t.shape)}")
