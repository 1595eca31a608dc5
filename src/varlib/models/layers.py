"""Transformer layers of VAR: attention with L2-normalised q/k, FFN, AdaLN blocks, the AdaLN head norm.

Shapes: B batch, L tokens, C width, D condition width (= C), H heads, c = C/H head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from varlib.models.attention import BlockCausalAttention


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class KVCache:
    """A preallocated key/value cache for one attention layer, filled scale by scale at inference.

    Args:
        batch, heads, max_len, head_dim: cache shape (B, H, max_len, c).
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k_BHLc = torch.empty(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v_BHLc = torch.empty_like(self.k_BHLc)
        self.length = 0

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this scale's keys/values; returns all keys/values so far, (B,H,length,c) each."""
        end = self.length + k_BHlc.shape[2]
        self.k_BHLc[:, :, self.length:end] = k_BHlc
        self.v_BHLc[:, :, self.length:end] = v_BHlc
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    def keep_rows(self, rows: int) -> None:
        """Keeps the first ``rows`` rows of the batch (views, no copy): sampling without guidance from here on."""
        self.k_BHLc, self.v_BHLc = self.k_BHLc[:rows], self.v_BHLc[:rows]


class SelfAttention(nn.Module):
    """Multi-head self-attention; with ``l2_norm`` q and k are unit vectors and q is scaled per head.

    The key has no bias (``zero_k_bias`` is a buffer, kept for official-checkpoint compatibility), and the
    per-head log-scale ``scale_mul_1H11`` (init ln 4) is capped at ln 100.
    """

    def __init__(self, width: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, l2_norm: bool = True):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(
        self, x_BLC: torch.Tensor, attention: BlockCausalAttention | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """(B,L,C) -> (B,L,C). ``attention`` is the teacher-forced block-causal attention; without it the
        queries attend to every key (with a ``kv_cache``: every cached key, all of coarser scales)."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BL3C = F.linear(x_BLC, self.mat_qkv.weight, bias)
        q, k, v = rearrange(qkv_BL3C, "B L (qkv H c) -> qkv B H L c", qkv=3, H=self.num_heads).unbind(0)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        # One compute dtype for q, k, v, as the official code casts them to its main type before attention: under
        # autocast F.normalize and the fp32 scale_mul leave q and k in fp32 beside a bf16 v, and FlexAttention
        # (unlike SDPA) is not autocast-aware, so it would refuse the mix or run fp32 kernels.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        dropout_p = self.attn_drop if self.training else 0.0
        if attention is None:
            outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)]
        else:
            outs = attention(q, k, v, self.scale, dropout_p)
        # q is laid out (B,L,H,c), and so is each SDPA output: the rearrange is a view, the projection keeps no copy
        projected = [self.proj(rearrange(out, "B H l c -> B l (H c)")) for out in outs]
        return self.proj_drop(projected[0] if len(projected) == 1 else torch.cat(projected, dim=1))


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to text token features (keys, values), padding masked.

    Args:
        width: C. context_dim: Dt, the width of the text features. num_heads: H.
    """

    def __init__(self, width: int, context_dim: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: torch.Tensor, tokens_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """(B,L,C), (B,T,Dt), (B,T) bool (True = a real token) -> (B,L,C)."""
        q = rearrange(self.q(x_BLC), "B L (H c) -> B H L c", H=self.num_heads)
        kv = self.kv(tokens_BTD.to(self.kv.weight.dtype))
        k, v = rearrange(kv, "B T (kv H c) -> kv B H T c", kv=2, H=self.num_heads).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=rearrange(mask_BT, "B T -> B 1 1 T"))
        return self.proj(rearrange(out, "B H L c -> B L (H c)"))


class FeedForward(nn.Module):
    """fc1 (C -> 4C), GELU(tanh), fc2 (4C -> C)."""

    def __init__(self, width: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    """A transformer block whose LayerNorms are modulated by the class condition (AdaLN).

    The condition gives six vectors (gamma1, gamma2, scale1, scale2, shift1, shift2):
    ``x += gamma1 * attn(LN(x) (1 + scale1) + shift1)`` then ``x += gamma2 * ffn(LN(x) (1 + scale2) + shift2)``.
    Per-block AdaLN maps the condition with its own ``ada_lin``; shared AdaLN (the 512px model) receives the
    already-mapped (B,1,6,C) vectors and adds a learned per-block offset ``ada_gss``.

    With ``cross_attn_dim`` (text conditioning), a cross-attention to the text token features sits between the
    self-attention and the FFN: ``x += cross_gate * cross_attn(LN(x), context)``. The gate starts at zero, so the
    block first computes exactly what it computes without it.
    """

    def __init__(
        self,
        width: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        cross_attn_dim: int | None = None,
    ):
        super().__init__()
        self.width = width
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(width, num_heads, attn_drop=attn_drop, proj_drop=drop, l2_norm=attn_l2_norm)
        self.ffn = FeedForward(width, round(width * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        if cross_attn_dim is not None:
            self.ln_cross = nn.LayerNorm(width, eps=norm_eps)
            self.cross_attn = CrossAttention(width, cross_attn_dim, num_heads)
            self.cross_gate = nn.Parameter(torch.zeros(width))

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        attention: BlockCausalAttention | None = None,
        kv_cache: KVCache | None = None,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B,L,C); cond is the condition (B,D), or with shared AdaLN the mapped (B,1,6,C); context, which a
        block with cross-attention needs, is the text (tokens (B,T,Dt), mask (B,T))."""
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h, attention=attention, kv_cache=kv_cache).mul_(gamma1))
        if hasattr(self, "cross_attn"):
            if context is None:
                raise ValueError("a block with cross-attention needs the text context (tokens, mask)")
            x_BLC = x_BLC + self.drop_path(self.cross_attn(self.ln_cross(x_BLC), *context).mul(self.cross_gate))
        h = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """The final AdaLN (scale, shift from the class embedding) before the output head."""

    def __init__(self, width: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection: (B,D) -> (B,1,6,C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class LNSelfAttn(nn.Module):
    """A pre-LN transformer block without AdaLN (the paper's Table 3 rows before "+AdaLN"): affine LayerNorms
    ``ln1``, ``ln2`` and no condition, ``x += attn(ln1(x))`` then ``x += ffn(ln2(x))``. The class reaches such a
    model only through its start token. Takes the arguments of :class:`AdaLNSelfAttn` less the conditioning ones.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, attn_l2_norm: bool = True):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ln1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = SelfAttention(width, num_heads, attn_drop=attn_drop, proj_drop=drop, l2_norm=attn_l2_norm)
        self.ln2 = nn.LayerNorm(width, eps=norm_eps)
        self.ffn = FeedForward(width, round(width * mlp_ratio), drop=drop)

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor | None = None,
                attention: BlockCausalAttention | None = None, kv_cache: KVCache | None = None,
                context: None = None) -> torch.Tensor:
        """(B,L,C) -> (B,L,C); ``cond`` is accepted for the AdaLN block's call and not used."""
        x_BLC = x_BLC + self.drop_path(self.attn(self.ln1(x_BLC), attention=attention, kv_cache=kv_cache))
        return x_BLC + self.drop_path(self.ffn(self.ln2(x_BLC)))


class LNBeforeHead(nn.LayerNorm):
    """The affine LayerNorm before the head of a model without AdaLN; ``cond_BD`` is accepted and not used."""

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x_BLC)
