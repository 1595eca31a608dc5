"""The multi-scale VQ autoencoder: a VQGAN-style CNN encoder/decoder around :class:`MultiScaleQuantizer`.

The module tree and parameter names follow the official ``VQVAE`` so official checkpoints load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from varlib.models.pretrained import PretrainedMixin
from varlib.models.patch_schedules import PATCH_NUMS_256, validate_patch_nums
from varlib.models.quantizer import MultiScaleQuantizer, QuantizerOutput

OFFICIAL_NORM_GROUPS = 32


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3 twice with a residual (1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = OFFICIAL_NORM_GROUPS):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one 1x1 ``qkv`` conv and a residual ``proj_out``."""

    def __init__(self, channels: int, norm_groups: int = OFFICIAL_NORM_GROUPS):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        H = x_BChw.shape[2]
        qkv_B3Chw = self.qkv(self.norm(x_BChw))
        q, k, v = rearrange(qkv_B3Chw, "B (qkv C) h w -> qkv B (h w) C", qkv=3).unbind(0)
        h_BLC = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x_BChw + self.proj_out(rearrange(h_BLC, "B (h w) C -> B C h w", h=H))


class Downsample2x(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (no padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


def _level(channels_in: int, channels: int, num_blocks: int, dropout: float, norm_groups: int, attention: bool,
           resample: type[nn.Module] | None) -> nn.Module:
    """One resolution level: ``num_blocks`` ResnetBlocks (channels_in -> channels, then channels -> channels), each
    followed by self-attention when ``attention``, then ``resample`` (Downsample2x or Upsample2x) when given."""
    blocks, attns = [], []
    for i in range(num_blocks):
        blocks.append(ResnetBlock(channels_in if i == 0 else channels, channels, dropout, norm_groups))
        if attention:
            attns.append(AttnBlock(channels, norm_groups))
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        level.add_module("downsample" if resample is Downsample2x else "upsample", resample(channels))
    return level


def _forward_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A level of :func:`_level`: its blocks (each with its attention, when it has them), then its resampling."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    for name in ("downsample", "upsample"):
        if hasattr(level, name):
            h = getattr(level, name)(h)
    return h


def _mid(channels: int, dropout: float, using_mid_sa: bool, norm_groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
    mid.attn_1 = AttnBlock(channels, norm_groups) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)
    return mid


@dataclass(frozen=True)
class CNNShape:
    """The shape of the tokenizer's encoder and decoder CNNs (see :class:`MultiScaleVQVAE`)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    dropout: float = 0.0
    using_sa: bool = True
    using_mid_sa: bool = True
    norm_groups: int = OFFICIAL_NORM_GROUPS


class Encoder(nn.Module):
    """Image (B,3,H,W) -> latent (B,z,H/2^(n-1),W/2^(n-1)) with n = len(ch_mult) levels.

    Each level has ``num_res_blocks`` ResnetBlocks; self-attention follows each block of the last level.
    """

    def __init__(self, shape: CNNShape, in_channels: int = 3):
        super().__init__()
        ch, ch_mult, num_res_blocks, dropout, norm_groups = (shape.ch, shape.ch_mult, shape.num_res_blocks,
                                                             shape.dropout, shape.norm_groups)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            last = i_level == len(ch_mult) - 1
            self.down.append(_level(block_in, ch * mult, num_res_blocks, dropout, norm_groups,
                                    last and shape.using_sa, None if last else Downsample2x))
            block_in = ch * mult
        self.mid = _mid(block_in, dropout, shape.using_mid_sa, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, shape.z_channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BChw)
        for level in self.down:
            h = _forward_level(level, h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,z,h,w) -> image (B,3,h*2^(n-1),w*2^(n-1)), unclamped (no tanh).

    Levels run from the coarsest (``up[n-1]``) to the finest (``up[0]``), each with ``num_res_blocks + 1``
    ResnetBlocks; self-attention follows each block of the coarsest level.
    """

    def __init__(self, shape: CNNShape, out_channels: int = 3):
        super().__init__()
        ch, ch_mult, num_res_blocks, dropout, norm_groups = (shape.ch, shape.ch_mult, shape.num_res_blocks,
                                                             shape.dropout, shape.norm_groups)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(shape.z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, dropout, shape.using_mid_sa, norm_groups)
        levels = []
        for i_level in reversed(range(len(ch_mult))):
            coarsest = i_level == len(ch_mult) - 1
            levels.insert(0, _level(block_in, ch * ch_mult[i_level], num_res_blocks + 1, dropout, norm_groups,
                                    coarsest and shape.using_sa, Upsample2x if i_level != 0 else None))
            block_in = ch * ch_mult[i_level]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for level in reversed(self.up):
            h = _forward_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The output conv's weight, for the adaptive GAN weight."""
        return self.conv_out.weight


def check_shape(vocab_size: int, z_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                norm_groups: int) -> None:
    """Raises ValueError for a tokenizer shape that cannot be built."""
    if norm_groups < 1 or any(ch * m % norm_groups for m in ch_mult):
        raise ValueError(
            f"every CNN width ch*ch_mult must be a multiple of norm_groups={norm_groups}, "
            f"got ch={ch}, ch_mult={tuple(ch_mult)}"
        )
    if vocab_size < 2 or z_channels < 1 or num_res_blocks < 1:
        raise ValueError(
            f"expected vocab_size >= 2, z_channels >= 1, num_res_blocks >= 1; got {vocab_size}, {z_channels}, {num_res_blocks}"
        )


class MultiScaleVQVAE(PretrainedMixin, nn.Module):
    """VAR's tokenizer: image <-> K token maps of growing resolution with one shared codebook.

    Args:
        vocab_size: V, codebook size (official 4096).
        z_channels: Cvae, latent/code channels (official 32).
        ch: base width of the CNN (official 160); every width ch*ch_mult must be a multiple of ``norm_groups``.
        patch_nums: the default token-map schedule; its last entry is the latent side, so images are
            ``patch_nums[-1] * downsample`` pixels square. Methods accept another schedule of equal length.
        ch_mult, num_res_blocks, dropout, using_sa, using_mid_sa: the CNN's shape (official vq-f16 values).
        beta: VQ commitment weight. quant_resi: phi's residual ratio. share_quant_resi: number of phi convs.
        norm_groups: GroupNorm groups (official 32). Narrow CNNs train much faster with fewer: at ch=32, 32 groups
            normalise every channel on its own.
    """

    FILE_KIND, FILE_PREFIX = "tokenizer", "vae"

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        in_channels: int = 3,
        norm_groups: int = OFFICIAL_NORM_GROUPS,
    ):
        super().__init__()
        check_shape(vocab_size, z_channels, ch, ch_mult, num_res_blocks, norm_groups)
        self.vocab_size, self.z_channels, self.in_channels = vocab_size, z_channels, in_channels
        self.patch_nums = validate_patch_nums(patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        cnn = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout,
                   using_sa=using_sa, using_mid_sa=using_mid_sa, norm_groups=norm_groups)
        self.config = dict(vocab_size=vocab_size, patch_nums=self.patch_nums, beta=beta, quant_resi=quant_resi,
                           share_quant_resi=share_quant_resi, in_channels=in_channels, **cnn)
        self.config["ch_mult"] = tuple(ch_mult)
        self.encoder = Encoder(CNNShape(**cnn), in_channels)
        self.decoder = Decoder(CNNShape(**cnn), out_channels=in_channels)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        num_phi = share_quant_resi if share_quant_resi > 0 else len(self.patch_nums)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, self.patch_nums, beta, quant_resi, num_phi)

    @property
    def image_size(self) -> int:
        """The side of the images the default schedule expects."""
        return self.patch_nums[-1] * self.downsample

    def check_images(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> None:
        """Raises ValueError unless ``img`` is (B, in_channels, S, S) with S = patch_nums[-1] * downsample."""
        pns = self.patch_nums if patch_nums is None else patch_nums
        side = pns[-1] * self.downsample
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {side}, {side}), got {tuple(img_B3HW.shape)}")
        if tuple(img_B3HW.shape[2:]) != (side, side):
            raise ValueError(
                f"image size {tuple(img_B3HW.shape[2:])} does not match the schedule {tuple(pns)}: "
                f"expected ({side}, {side}) = last patch number {pns[-1]} x downsample {self.downsample}"
            )

    # -- Algorithm 1 / 2 on images -----------------------------------------------------------------

    def encode(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Image in [-1,1] (B,3,H,W) -> continuous latent f (B,Cvae,H/16,W/16) before quantization."""
        self.check_images(img_B3HW, patch_nums)
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def encode_tokens(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Algorithm 1 (multi-scale VQVAE encoding): image in [-1,1] -> K LongTensors (B, pn_k^2)."""
        return self.quantize.f_to_tokens(self.encode(img_B3HW, patch_nums), patch_nums)

    @torch.no_grad()
    def encode_fhat_per_scale(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The cumulative reconstruction f_hat after each scale of Algorithm 1: K tensors (B,Cvae,h,w)."""
        return self.quantize.f_to_tokens(self.encode(img_B3HW, patch_nums), patch_nums, return_fhat=True)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decoder on a (B,Cvae,h,w) f_hat -> image (B,3,H,W) clamped to [-1,1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    @torch.no_grad()
    def decode_tokens(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Algorithm 2 (multi-scale VQVAE reconstruction): K LongTensors (B, pn_k^2) -> image (B,3,H,W) in [-1,1]."""
        return self.fhat_to_img(self.quantize.tokens_to_fhat(tokens, patch_nums))

    def teacher_forcing_input(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """The VAR transformer's input for scales 1..K-1: (B, L-1, Cvae). See ``MultiScaleQuantizer``."""
        return self.quantize.teacher_forcing_input(tokens, patch_nums)

    # -- training ------------------------------------------------------------------------------

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training forward: image in [-1,1] -> (unclamped reconstruction (B,3,H,W), quantizer output)."""
        quant = self.quantize(self.encode(img_B3HW))
        return self.decoder(self.post_quant_conv(quant.f_hat_st)), quant
