"""A dtype probe around the block-causal attention call: FlexAttention is not autocast-aware, so q, k and v must
reach it in one compute dtype (the autocast dtype under autocast, else the projection's)."""

from __future__ import annotations

import pytest
import torch

from varlib.models.attention import BlockCausalAttention


def probe_attention_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.dtype]]:
    """Wraps ``BlockCausalAttention.__call__`` for the test: every call asserts that q, k and v share the compute
    dtype and appends (implementation, dtype) to the returned list."""
    seen: list[tuple[str, torch.dtype]] = []
    attend = BlockCausalAttention.__call__

    def probe(self, q_BHLc, k_BHLc, v_BHLc, *args, **kwargs):
        device = q_BHLc.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v_BHLc.dtype
        dtypes = (q_BHLc.dtype, k_BHLc.dtype, v_BHLc.dtype)
        assert dtypes == (compute,) * 3, f"{self.impl} attention got q, k, v in {dtypes}, expected {compute}"
        seen.append((self.impl, compute))
        return attend(self, q_BHLc, k_BHLc, v_BHLc, *args, **kwargs)

    monkeypatch.setattr(BlockCausalAttention, "__call__", probe)
    return seen
