"""varlib.evaluation.per_scale: the per-scale loss and error metrics (PerScaleAccumulator, through one batch)."""

import math

import pytest
import torch

from helpers.per_scale import per_scale_metrics


def test_per_scale_metrics_by_hand():
    V = 4
    targets = torch.tensor([[0, 1, 2, 3, 0]])  # scales (1, 2): 1 + 4 tokens
    logits = torch.full((1, 5, V), -10.0)
    logits[0, torch.arange(5), torch.tensor([0, 1, 2, 0, 0])] = 10.0  # one wrong token, in scale 1
    m = per_scale_metrics(logits, targets, (1, 2))
    assert m["err_avg"] == pytest.approx(20.0) and m["err_last"] == pytest.approx(25.0) and m["err_s0"] == 0.0
    ce_wrong = 20 + math.log(1 + 3 * math.exp(-20))
    ce_right = math.log(1 + 3 * math.exp(-20))
    assert m["loss_last"] == pytest.approx((3 * ce_right + ce_wrong) / 4, rel=1e-5)
    assert m["loss_avg"] == pytest.approx((4 * ce_right + ce_wrong) / 5, rel=1e-5)
