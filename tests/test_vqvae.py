"""varlib.models.vqvae (MultiScaleVQVAE): the official key layout, input validation and other patch schedules."""

import pytest
import torch

from helpers.manifests import manifest, meta_models, shapes

from varlib import VAR, MultiScaleVQVAE, VARConfig


def test_official_vqvae_layout_matches_manifest():
    vae, _ = meta_models(1)
    assert shapes(vae) == {k: v["shape"] for k, v in manifest("manifest_vqvae_ch160v4096z32.json").items()}
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355


def test_bad_images_raise(tiny_models):
    vae, _, b = tiny_models
    side = b["config"]["image_size"]
    with pytest.raises(ValueError, match=rf"expected \({side}, {side}\)"):
        vae.encode_tokens(torch.zeros(1, 3, side // 2, side // 2))
    with pytest.raises(ValueError, match="expected images of shape"):
        vae.encode_tokens(torch.zeros(1, 4, side, side))


def test_schedule_must_end_at_latent_and_widths_fit_groupnorm():
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 3, 2))
    with pytest.raises(ValueError, match="multiple of norm_groups=32"):
        MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=16)
    with pytest.raises(ValueError, match="multiple of norm_groups=3"):
        MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=16, norm_groups=3)
    narrow = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=16, patch_nums=(1, 2, 4), norm_groups=8)
    assert {m.num_groups for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="last patch number must equal the latent side"):
        vae.quantize.f_to_tokens(torch.zeros(1, 8, 3, 3))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        VAR(vae, VARConfig(depth=0, num_classes=3))


def test_other_schedules_round_trip():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 3, 6), ch_mult=(1, 2, 2)).eval()
    img = torch.rand(2, 3, 24, 24) * 2 - 1
    tokens = vae.encode_tokens(img)
    assert [t.shape for t in tokens] == [(2, 1), (2, 9), (2, 36)]
    assert vae.decode_tokens(tokens).shape == (2, 3, 24, 24)
    assert vae.teacher_forcing_input(tokens).shape == (2, 45, 8)
