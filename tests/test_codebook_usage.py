"""varlib.evaluation.codebook_usage: the share of the codebook a split uses."""

import pytest
import torch

from varlib.evaluation.codebook_usage import CodebookUsage


def test_codebook_usage_metric_counts_each_code_once():
    usage = CodebookUsage(vocab_size=8)
    usage.update(torch.tensor([[0, 0, 1]]))
    usage.update(torch.tensor([1, 5]))
    assert usage.compute().item() == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        usage.update(torch.tensor([8]))
