"""Block-causal attention of teacher-forced next-scale prediction: a token sees its own and every coarser scale.

Three exact implementations, chosen with ``attn_impl`` (``auto`` picks the fastest exact one for the device):

- ``dense``: the reference. SDPA over all L x L (query, key) pairs with the additive mask; the masked-out
  ~35% (512px) of the work is still paid for.
- ``prefix``: scale by scale, the queries of scale k attend to the key prefix [0, end_k) with unmasked
  SDPA; scales of fewer than ``SMALL_SCALE_TOKENS`` tokens are grouped under a small slice of the mask.
  Only the visible pairs are computed. The fastest exact path on CPU.
- ``flex``: FlexAttention with a block mask built from the scale offsets, compiled once per schedule
  (FoundationVision/Infinity's approach). The fastest on CUDA; on CPU FlexAttention has no backward, so it
  only serves no-grad checks there.

Shapes: B batch, H heads, L tokens (a scale-boundary prefix of the schedule), c head width.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

#: The settings ``VAR(attn_impl=...)`` accepts.
ATTN_IMPLS = ("auto", "dense", "prefix", "flex")
#: Scales with fewer tokens are grouped (with a mask) rather than attended one by one: a call per 1x1 map
#: costs more than the few masked pairs a group adds.
SMALL_SCALE_TOKENS = 64


def flex_attention_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attn_impl(impl: str, device: torch.device, attn_dropout: bool = False) -> str:
    """The concrete implementation for ``impl`` on ``device``: ``auto`` -> flex on CUDA, prefix elsewhere
    (and whenever attention dropout is on, which FlexAttention lacks)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "auto":
        use_flex = device.type == "cuda" and not attn_dropout and flex_attention_available()
        return "flex" if use_flex else "prefix"
    if impl == "flex" and attn_dropout:
        raise ValueError("attn_impl='flex' does not support attention dropout; use 'prefix' or 'dense'")
    if impl == "flex" and not flex_attention_available():
        raise ValueError(f"attn_impl='flex' needs torch.nn.attention.flex_attention (torch {torch.__version__} lacks it)")
    return impl


def scale_groups(patch_nums: Sequence[int], length: int) -> list[tuple[int, int]]:
    """Query ranges [start, end) of the prefix path, covering [0, length): each scale of at least
    ``SMALL_SCALE_TOKENS`` tokens alone, consecutive smaller ones together."""
    groups: list[list[int]] = []
    start = 0
    for pn in patch_nums:
        if start >= length:
            break
        end = start + pn * pn
        if groups and pn * pn < SMALL_SCALE_TOKENS and groups[-1][1] - groups[-1][0] < SMALL_SCALE_TOKENS:
            groups[-1][1] = end
        else:
            groups.append([start, end])
        start = end
    return [(a, b) for a, b in groups]


class _KeyPrefixes(torch.autograd.Function):
    """Views k[:, :, :end] for each end; the backward sums their gradients into one buffer (slicing each
    view separately would allocate and zero-fill a full-size gradient per group)."""

    @staticmethod
    def forward(ctx, x_BHLc: torch.Tensor, ends: tuple[int, ...]):
        ctx.ends, ctx.shape = ends, x_BHLc.shape
        return tuple(x_BHLc[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for end, grad in zip(ctx.ends, grads):
            if grad is None:
                continue
            if total is None:
                total = grad.new_zeros(ctx.shape)
            total[:, :, :end] += grad
        return total, None


class BlockCausalAttention:
    """The block-causal attention of one forward over ``length`` tokens, shared by every block.

    Args:
        patch_nums: the schedule. bias_11LL: the additive block-causal mask (0 / -inf), at least
            (length, length). level_L: the scale index of each token. impl: dense, prefix or flex.
    """

    def __init__(self, patch_nums: Sequence[int], bias_11LL: torch.Tensor, level_L: torch.Tensor, length: int, impl: str):
        self.impl, self.length = impl, length
        # A plan is cached and reused by later forwards, whatever their grad mode: built under inference mode (the
        # first forward of a run may be Lightning's sanity check, which runs under torch.inference_mode on GPUs),
        # its tensors would be inference tensors, which a later training forward's autograd refuses to save.
        with torch.inference_mode(False):
            if impl == "dense":
                self.bias_11LL = bias_11LL[:, :, :length, :length]
            elif impl == "prefix":
                self.groups = scale_groups(patch_nums, length)
                self.ends = tuple(end for _, end in self.groups)
                # a group of one scale sees its whole key prefix: no mask
                self.masks = [None if level_L[a] == level_L[b - 1] else bias_11LL[:, :, a:b, :b]
                              for a, b in self.groups]
            elif impl == "flex":
                self.block_mask = _flex_block_mask(level_L[:length].contiguous(), length)
            else:
                raise ValueError(f"expected a concrete attention implementation (dense, prefix, flex), got {impl!r}")

    def __call__(self, q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                 dropout_p: float = 0.0) -> list[torch.Tensor]:
        """The attention output of consecutive query ranges, (B,H,l,c) each; along L they make up the (B,H,L,c)
        output. The prefix path returns one per group, so that the caller projects each group's output
        without first concatenating them into a copy that the projection's backward would keep."""
        if self.impl == "dense":
            return [F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=self.bias_11LL,
                                                   dropout_p=dropout_p, scale=scale)]
        if self.impl == "flex":
            flex = _flex_attention(q_BHLc.device.type)
            return [flex(q_BHLc, k_BHLc, v_BHLc, block_mask=self.block_mask, scale=scale)]
        queries = q_BHLc.split([b - a for a, b in self.groups], dim=2)
        keys, values = _KeyPrefixes.apply(k_BHLc, self.ends), _KeyPrefixes.apply(v_BHLc, self.ends)
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
                for q, k, v, mask in zip(queries, keys, values, self.masks)]


def _flex_block_mask(level_L: torch.Tensor, length: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):
        return level_L[q_idx] >= level_L[kv_idx]

    return create_block_mask(visible, B=None, H=None, Q_LEN=length, KV_LEN=length, device=level_L.device)


#: How FlexAttention is compiled on CUDA. Dynamic shapes: with static ones each new (batch, length, grad mode)
#: recompiles (progressive training alone has a length per scale, validation and the benchmarks' batch search add
#: more), past Dynamo's recompile limit, after which flex falls back to eager and materialises (B,H,L,L) scores.
#: With dynamic batch and length, a grad mode costs about three graphs (lengths and batches of 1 are specialised).
FLEX_COMPILE_OPTIONS = {"dynamic": True}


@functools.cache
def _flex_attention(device_type: str):
    """FlexAttention compiled once per process on CUDA (torch.compile generates its kernels); eager
    elsewhere, where it serves forward-only checks."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, **FLEX_COMPILE_OPTIONS) if device_type == "cuda" else flex_attention
