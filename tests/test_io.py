"""varlib's own model files round-trip through varlib.load."""

import pytest
import torch

import varlib


def test_tokenizer_and_var_files_round_trip(tiny_models, tmp_path):
    vae, var, b = tiny_models
    varlib.save_tokenizer(vae, tmp_path / "tok.safetensors")
    loaded = varlib.load(tmp_path / "tok.safetensors")
    assert isinstance(loaded, varlib.MultiScaleVQVAE) and not loaded.training
    assert torch.equal(loaded.decode_tokens(b["vq"]["idx_Bl"]), vae.decode_tokens(b["vq"]["idx_Bl"]))

    varlib.save_var(var, tmp_path / "var.safetensors")
    loaded_var = varlib.load(tmp_path / "var.safetensors")
    assert isinstance(loaded_var, varlib.VAR) and loaded_var.config == var.config
    assert torch.equal(loaded_var.generate([1, 2], top_k=3, seed=0), var.generate([1, 2], top_k=3, seed=0))


def test_load_rejects_foreign_files(tiny_models, tmp_path):
    _, _, b = tiny_models
    torch.save(b["var_state_dict"], tmp_path / "official.pth")
    with pytest.raises(ValueError, match="not a varlib model file"):
        varlib.load(tmp_path / "official.pth")
    with pytest.raises(FileNotFoundError):
        varlib.load(tmp_path / "absent.safetensors")
