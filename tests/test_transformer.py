"""varlib.models.transformer (VAR): the official key layout and parameter counts, init statistics, label dropout,
KV-cache sampling and input validation."""

import pytest
import torch

from helpers.manifests import manifest, meta_models, shapes

from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.patch_schedules import PATCH_NUMS_512


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


def test_official_init_statistics():
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 1, 2, 2, 4))
    torch.manual_seed(0)
    var = VAR(vae, VARConfig(depth=4, num_classes=10, init_adaln_gamma=1e-3))
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


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_label_dropout_replaces_labels_by_the_null_class_at_the_configured_rate(rate):
    """The labels the class embedding receives: each is the null class with probability ``rate`` in training mode
    (the count within 4 binomial standard deviations of rate x rows), the original label otherwise."""
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=16, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    var = VAR(vae, VARConfig(depth=1, num_classes=10, width=32, num_heads=2, cond_drop_rate=rate))
    rows = 4000
    labels = torch.arange(rows) % 10
    seen = []
    var.class_emb.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    with torch.no_grad():
        var.train()(labels, torch.zeros(rows, var.L - 1, 4))
        var.eval()(labels, torch.zeros(rows, var.L - 1, 4))
    trained, evaluated = seen
    dropped = trained == var.num_classes
    assert torch.equal(trained[~dropped], labels[~dropped])  # kept rows keep their own label
    std = (rows * rate * (1 - rate)) ** 0.5
    assert abs(dropped.sum().item() - rate * rows) < 4 * std, (dropped.sum().item(), rate * rows)
    assert torch.equal(evaluated, labels)  # never in eval mode


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


def test_bad_teacher_forcing_input_raises(tiny_models):
    _, var, b = tiny_models
    with pytest.raises(ValueError, match="teacher-forcing input"):
        var(torch.tensor([0, 1]), torch.zeros(2, 7, b["config"]["Cvae"]))


def test_sample_per_class_seed_scheme_and_model_defaults(tiny_models):
    """Batch i of class c is ``generate([c]*n, seed=seed + 1000*c + i)`` with the model's own sampling settings."""
    from varlib.models.sampling import sample_per_class

    _, var, _ = tiny_models
    images = sample_per_class(var, per_class=3, seed=5, batch_size=2)
    assert images.shape[0] == var.num_classes * 3
    for label in (0, var.num_classes - 1):
        expected = torch.cat([var.generate([label] * 2, seed=5 + 1000 * label),
                              var.generate([label], seed=5 + 1000 * label + 1)])
        assert torch.equal(images[3 * label:3 * label + 3], expected)
    guided = sample_per_class(var, per_class=1, seed=5, cfg=var.sampling.cfg + 2.0)
    assert torch.equal(guided[:1], var.generate([0], seed=5, cfg=var.sampling.cfg + 2.0))
    assert not torch.equal(guided, images[::3])


def test_var_config_resolves_the_depth_scaled_shape_and_checks_its_values():
    config = VARConfig(depth=4, num_classes=10)
    assert (config.width, config.num_heads, config.drop_path_rate) == (256, 4, pytest.approx(0.1 * 4 / 24))
    assert VARConfig(depth=4, width=64, num_heads=2, patch_nums=[1, 2]).patch_nums == (1, 2)
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        VARConfig(depth=0)
    with pytest.raises(ValueError, match=r"cond_drop_rate must be in \[0, 1\), got 1.0"):
        VARConfig(cond_drop_rate=1.0)
    with pytest.raises(ValueError, match="adaln=False takes class conditioning and no shared AdaLN"):
        VARConfig(adaln=False, shared_aln=True)


def test_var_config_from_dict_names_unknown_keys_and_defaults_missing_ones():
    with pytest.raises(ValueError, match=r"unknown model.var keys \['attn_impl', 'dept'\]; expected some of \['depth'"):
        VARConfig.from_dict({"dept": 2, "attn_impl": "auto"})
    written_before_adaln = {"depth": 2, "num_classes": 3, "width": 64, "num_heads": 2}
    config = VARConfig.from_dict(written_before_adaln, "var_config")
    assert config.adaln and config.init_adaln_gamma == 1e-5 and config.cond_drop_rate == 0.1


def test_a_var_records_its_config_as_built():
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=16, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    config = VARConfig(depth=1, num_classes=10, width=32, num_heads=2, init_adaln_gamma=1e-3)
    var = VAR(vae, config)
    assert var.var_config.patch_nums == (1, 2) and var.var_config.conditioning == {"type": "class"}
    assert var.config == {**config.to_dict(), "patch_nums": (1, 2), "conditioning": {"type": "class"}}
    assert VARConfig.from_dict(var.config) == var.var_config
    assert VAR(vae, var.var_config).config == var.config
