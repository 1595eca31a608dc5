"""varlib.files.official: loading the official checkpoints refuses other models, depths and wrapped files."""

import pytest
import torch

import varlib
from varlib import MultiScaleVQVAE, load_official_var, load_official_vqvae


def test_loading_rejects_other_models_and_depths(tiny_models, tmp_path):
    vae, var, b = tiny_models
    with pytest.raises(ValueError, match="not a VQVAE state dict"):
        load_official_vqvae(b["var_state_dict"])
    with pytest.raises(ValueError, match="not a VAR state dict"):
        load_official_var(b["vqvae_state_dict"], vae)
    sd = dict(b["var_state_dict"])
    sd.pop("blocks.1.attn.q_bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[blocks.1.attn.q_bias\]; unexpected keys \[extra.weight\]"):
        load_official_var(sd, vae, depth=2)
    with pytest.raises(ValueError, match="missing keys"):
        load_official_var(b["var_state_dict"], vae, depth=3, width=128, num_heads=2)
    other_vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=b["config"]["patch_nums"])
    with pytest.raises(ValueError, match=rf"V={b['config']['V']}, got Cvae=8 and V=32"):
        load_official_var(b["var_state_dict"], other_vae)
    path = tmp_path / "var.pth"
    torch.save(b["var_state_dict"], path)
    loaded = varlib.load(path, vae=vae)
    assert torch.equal(loaded.head.weight, var.head.weight)
    torch.save({"model": b["var_state_dict"], "step": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        varlib.load(tmp_path / "wrapped.pth", vae=vae)
    with pytest.raises(FileNotFoundError):
        varlib.load(tmp_path / "absent.pth")
    with pytest.raises(TypeError, match=r"open checkpoint files with varlib.load\(path\)"):
        load_official_vqvae(path)
