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


@pytest.mark.slow
def test_an_official_512px_shared_adaln_checkpoint_opens_and_samples(tmp_path):
    """A tiny VAR-d36-s: the official key names and shapes of the 512px shared-AdaLN model at depth 2 (width 128,
    tests/data/manifest_var_saln_depth2_512px.json), random weights, saved as the official plain state dict."""
    from helpers.manifests import manifest

    from varlib.models.patch_schedules import PATCH_NUMS_512

    torch.manual_seed(0)
    levels_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(PATCH_NUMS_512)])
    state = {}
    for key, entry in manifest("manifest_var_saln_depth2_512px.json").items():
        if key == "lvl_1L":
            state[key] = levels_L.view(1, -1)
        elif key == "attn_bias_for_masking":
            visible = levels_L.view(-1, 1) >= levels_L.view(1, -1)
            state[key] = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).view(entry["shape"])
        elif key.endswith("zero_k_bias"):
            state[key] = torch.zeros(entry["shape"])
        else:
            state[key] = 0.02 * torch.randn(entry["shape"])
    torch.save(state, tmp_path / "var_d2_512.pth")
    # a small tokenizer of the official code space (4096 codes of 32 channels, 16x down-sampling, 10 scales)
    tokenizer = MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=8, ch_mult=(1, 1, 1, 1, 1), using_sa=False,
                                using_mid_sa=False, norm_groups=8)
    varlib.save_tokenizer(tokenizer, tmp_path / "tokenizer.safetensors")

    var = varlib.load(tmp_path / "var_d2_512.pth", vae=tmp_path / "tokenizer.safetensors")
    assert var.patch_nums == PATCH_NUMS_512 and var.L == 2240 and var.config["shared_aln"]
    assert var.depth == 2 and var.width == 128 and var.config["adaln"] and var.config["attn_l2_norm"]
    assert {k: v.shape for k, v in var.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(var.state_dict()[k], v) for k, v in state.items())
    # one image, without guidance (half the rows) and top-p (a sort of 2240 x 4096 logits): seconds on a CPU
    image = var.generate([3], seed=0, cfg=0, top_k=5, top_p=0)
    assert image.shape == (1, 3, 512, 512) and 0 <= image.min() < image.max() <= 1
    assert torch.equal(image, var.generate([3], seed=0, cfg=0, top_k=5, top_p=0))
