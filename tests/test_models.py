"""Model structure, official key layout, input validation and loading errors."""

import json
from pathlib import Path

import pytest
import torch

import varlib
from varlib import VAR, MultiScaleVQVAE, load_official_var, load_official_vqvae
from varlib.models.schedules import PATCH_NUMS_512, phi_index_per_scale, sequence_length

DATA = Path(__file__).parent / "data"


def manifest(name):
    return json.loads((DATA / name).read_text())


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def meta_models(depth, **var_kwargs):
    with torch.device("meta"):
        vae = MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=160)
        return vae, VAR(vae, depth=depth, num_classes=1000, **var_kwargs)


def test_official_vqvae_layout_matches_manifest():
    vae, _ = meta_models(1)
    assert shapes(vae) == {k: v["shape"] for k, v in manifest("manifest_vqvae_ch160v4096z32.json").items()}
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355


def test_d16_layout_and_parameter_count_match_official():
    _, var = meta_models(16)
    assert shapes(var) == {k: v["shape"] for k, v in manifest("manifest_var_d16.json").items()}
    assert sum(p.numel() for p in var.parameters()) == 310_283_520
    assert var.state_dict()["lvl_1L"].dtype == torch.int64


def test_shared_adaln_512px_layout_matches_manifest():
    _, var = meta_models(2, shared_aln=True, patch_nums=PATCH_NUMS_512)
    assert shapes(var) == {k: v["shape"] for k, v in manifest("manifest_var_saln_depth2_512px.json").items()}


@pytest.mark.parametrize("depth,count", [(20, 600_917_136), (30, 2_010_020_356)])
def test_depth_scaled_parameter_counts(depth, count):
    _, var = meta_models(depth)
    assert sum(p.numel() for p in var.parameters()) == count
    assert var.width == 64 * depth and var.num_heads == depth


def test_d36_shared_adaln_parameter_count():
    _, var = meta_models(36, shared_aln=True, patch_nums=PATCH_NUMS_512)
    assert sum(p.numel() for p in var.parameters()) == 2_353_893_904


def test_phi_index_rule_matches_official_table():
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_per_scale(4, 4) == [0, 1, 2, 3]
    assert phi_index_per_scale(10, 10) == list(range(10))
    assert sequence_length(PATCH_NUMS_512) == 2240


def test_official_init_statistics():
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 1, 2, 2, 4))
    torch.manual_seed(0)
    var = VAR(vae, depth=4, num_classes=10, init_adaln_gamma=1e-3)
    std = (1 / 256 / 3) ** 0.5
    assert abs(var.class_emb.weight.std().item() - std) < 0.1 * std
    assert abs(var.blocks[0].ffn.fc2.weight.std().item() - std / 8 ** 0.5) < 0.1 * std / 8 ** 0.5
    gammas = var.blocks[0].ada_lin[1].weight[: 2 * 256]
    assert abs(gammas.std().item() - std * 1e-3) < 0.1 * std * 1e-3
    assert torch.all(var.head.bias == 0) and abs(var.head.weight.std().item() - 0.02 * std) < 0.1 * 0.02 * std
    assert torch.allclose(var.blocks[1].attn.scale_mul_1H11, torch.full((1, 4, 1, 1), 4.0).log())
    assert var.blocks[0].drop_path.__class__.__name__ == "Identity"
    assert var.blocks[-1].drop_path.p == pytest.approx(0.1 * 4 / 24)


def test_label_dropout_only_in_training(tiny_models):
    vae, var, b = tiny_models
    x = b["vq"]["teacher_forcing_input"].repeat(32, 1, 1)
    labels = torch.full((64,), 3)
    var.eval()
    with torch.no_grad():
        a, c = var(labels, x), var(labels, x)
    assert torch.equal(a, c)
    null = var.num_classes
    var.train()
    var.cond_drop_rate = 0.5
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            trained = var(labels, x)
            uncond = var.eval()(torch.full((64,), null), x)
    finally:
        var.cond_drop_rate = 0.1
        var.eval()
    # dropped rows equal the null-class logits; with p=0.5 some but not all of 64 rows drop
    # (drop-path is 0 at depth 2 block 0 and tiny at block 1, so compare loosely per row)
    same_as_null = [(trained[i] - uncond[i]).abs().max() < (trained[i] - a[i]).abs().max() for i in range(64)]
    assert 5 < sum(same_as_null) < 59


def test_kv_cache_sampling_logits_match_teacher_forced_forward(tiny_models):
    """Feeding the sampled tokens back through the block-causal forward reproduces the cached logits."""
    vae, var, b = tiny_models
    labels = torch.tensor([1, 4])
    seen = []
    original = var.get_logits

    def spy(h, cond):
        logits = original(h, cond)
        seen.append(logits.clone())  # the sampler masks its logits in place
        return logits

    var.get_logits = spy
    try:
        out = var.generate_tokens(labels, cfg=0.0, top_k=5, seed=3)
    finally:
        del var.get_logits
    with torch.no_grad():
        full = var(labels, vae.teacher_forcing_input(out.tokens))
    torch.testing.assert_close(torch.cat(seen, dim=1), full, atol=1e-4, rtol=0)


def test_generate_any_batch_size_labels_and_determinism(tiny_models):
    _, var, b = tiny_models
    null = var.num_classes
    img = var.generate([0, null, 5], cfg=1.5, top_k=10, top_p=0.9, seed=7)
    side = b["config"]["image_size"]
    assert img.shape == (3, 3, side, side) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, var.generate([0, null, 5], cfg=1.5, top_k=10, top_p=0.9, seed=7))
    assert not torch.equal(img, var.generate([0, null, 5], cfg=1.5, top_k=10, top_p=0.9, seed=8))
    assert var.generate(2, batch_size=5, seed=0, more_smooth=True).shape[0] == 5


@pytest.mark.parametrize("labels", [[-1], [11], [0.5]])
def test_bad_labels_raise(tiny_models, labels):
    _, var, _ = tiny_models
    with pytest.raises(ValueError, match="labels"):
        var.generate(labels, seed=0)


def test_bad_images_raise(tiny_models):
    vae, _, b = tiny_models
    side = b["config"]["image_size"]
    with pytest.raises(ValueError, match=rf"expected \({side}, {side}\)"):
        vae.encode_tokens(torch.zeros(1, 3, side // 2, side // 2))
    with pytest.raises(ValueError, match="expected images of shape"):
        vae.encode_tokens(torch.zeros(1, 4, side, side))


def test_bad_teacher_forcing_input_raises(tiny_models):
    _, var, b = tiny_models
    with pytest.raises(ValueError, match="teacher-forcing input"):
        var(torch.tensor([0, 1]), torch.zeros(2, 7, b["config"]["Cvae"]))


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
        VAR(vae, depth=0, num_classes=3)


def test_other_schedules_round_trip():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 3, 6), ch_mult=(1, 2, 2)).eval()
    img = torch.rand(2, 3, 24, 24) * 2 - 1
    tokens = vae.encode_tokens(img)
    assert [t.shape for t in tokens] == [(2, 1), (2, 9), (2, 36)]
    assert vae.decode_tokens(tokens).shape == (2, 3, 24, 24)
    assert vae.teacher_forcing_input(tokens).shape == (2, 45, 8)


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


def test_quantizer_training_statistics_and_dead_code_restart():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).train()
    img = torch.rand(4, 3, 64, 64) * 2 - 1
    rec, q = vae(img)
    assert rec.shape == img.shape and q.usage.shape == (4,) and q.perplexity.shape == (4,)
    assert torch.all(q.usage > 0) and torch.all(q.usage <= 1) and q.usage[0] <= 4 / 64
    assert torch.all(q.perplexity >= 1)
    (rec.square().mean() + q.vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    hits = vae.quantize.ema_vocab_hit_SV
    assert hits.sum() > 0
    dead = (hits < 1e-3).all(dim=0)
    restarted = vae.quantize.restart_dead_codes(vae.encode(img))
    assert restarted == int(dead.sum()) > 0
    assert not (vae.quantize.ema_vocab_hit_SV < 1e-3).all(dim=0).any()
