"""Training FLOPs of VAR: the one count behind the scaling-law records and the speed benchmark's MFU.

Per token, forward + backward::

    flops_per_token = 6 * N + 12 * depth * L_eff * C

``N`` counts the parameters of the linear layers applied to every token (word_embed, the attention qkv and
output projections, both FFN layers and the head). The embedding tables and the AdaLN projections are left
out: they run once per image (on the class condition), not once per token; so are a text model's text encoder,
pooled projection and cross-attention key/value projections, which run once per prompt or text token (its
cross-attention's query and output projections are counted). 6N is 2 FLOPs per multiply-add,
times 3 for forward + backward. The attention term counts q.k and attention.v (2 * 2 * L_eff * C FLOPs
forward per token and layer), times 3 for backward. ``L_eff`` is the exact mean number of keys a query sees
under VAR's block-causal mask: a token of scale k attends to every token of scales 0..k, so
``L_eff = sum_k pn_k^2 * (pn_0^2 + ... + pn_k^2) / L``. The tokenizer is not counted.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from varlib.models.patch_schedules import sequence_length

#: linear layers that do not run on image tokens: AdaLN (per image), the text conditioning (per prompt or text
#: token) and the cross-attention's keys and values (per text token)
NOT_PER_TOKEN = ("ada_lin", "text_cond.", "cross_attn.kv")


def visible_keys_per_query(patch_nums: Sequence[int]) -> float:
    """L_eff: the mean number of keys a query attends to under the block-causal mask."""
    seen, total = 0, 0
    for pn in patch_nums:
        seen += pn * pn
        total += pn * pn * seen
    return total / sequence_length(patch_nums)


def per_token_linear_params(transformer: nn.Module) -> int:
    """N: parameters of the linear layers applied to every token (all ``nn.Linear`` but :data:`NOT_PER_TOKEN`)."""
    return sum(
        p.numel()
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in NOT_PER_TOKEN)
        for p in module.parameters(recurse=False)
    )


def flops_per_token(per_token_params: float, depth: int = 0, width: int = 0, patch_nums: Sequence[int] = ()) -> float:
    """6 N + 12 depth L_eff C (see the module docstring); without ``patch_nums`` the attention term is left
    out, which is Kaplan et al.'s 6 N."""
    attention = 12 * depth * width * visible_keys_per_query(patch_nums) if patch_nums else 0.0
    return 6 * per_token_params + attention
