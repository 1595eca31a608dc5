"""varlib.evaluation.inception: loading the Inception weights, and the extractor's outputs."""

from __future__ import annotations

import pytest
import torch

from helpers.extractors import random_uint8_images

from varlib.evaluation import (
    INCEPTION_WEIGHTS_FILENAME,
    build_inception_extractor,
)


def test_missing_inception_weights_error_names_file_locations_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as error:
        build_inception_extractor()
    message = str(error.value)
    assert INCEPTION_WEIGHTS_FILENAME in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "https://" in message
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        build_inception_extractor(tmp_path / "elsewhere.pth")


def test_corrupt_inception_weights_raise_value_error(tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_FILENAME
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="tensor-only state_dict"):
        build_inception_extractor(weights)


@pytest.mark.slow  # writes and loads a 95 MB state_dict (about 7 s)
def test_inception_loads_from_hub_cache_and_returns_pool_features_and_bias_free_logits(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    # torchvision's Inception3 (1008 classes, no aux head) has the same state_dict layout as the FID weights.
    torch.manual_seed(0)
    state_dict = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict()
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / INCEPTION_WEIGHTS_FILENAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    extractor = build_inception_extractor()
    assert extractor.weights_path == checkpoints / INCEPTION_WEIGHTS_FILENAME
    features_BD, logits_BK = extractor(random_uint8_images(2, seed=1, size=32))
    assert features_BD.shape == (2, 2048) and logits_BK.shape == (2, 1008)
    assert torch.isfinite(features_BD).all() and features_BD.abs().sum() > 0
    # ADM's Inception Score uses pool_3 @ W without the fc bias.
    torch.testing.assert_close(logits_BK, features_BD @ state_dict["fc.weight"].T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.rand(2, 3, 32, 32))
