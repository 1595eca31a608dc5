"""varlib.training.ema: the weight EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from varlib.training.ema import ModelEMA


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
