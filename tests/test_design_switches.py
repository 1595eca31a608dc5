"""The paper's Table 3 rows as switches: ``adaln`` (class through AdaLN, or only through the start token),
``attn_l2_norm`` (L2-normalised q/k, or plain scaled attention) and the sampling rows (top-k/top-p, guidance)."""

import pytest
import torch

import varlib
from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.layers import SelfAttention
from varlib.models.raster_ar import RasterAR
from varlib.models.text import SmallTextEncoder


def tiny_vae(patch_nums=(1, 2, 3, 4)):
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=patch_nums).eval()


def tiny_var(**kwargs):
    torch.manual_seed(1)
    var = VAR(tiny_vae(), VARConfig(depth=2, num_classes=5, width=64, num_heads=2, **kwargs)).eval()
    with torch.no_grad():  # the official gamma init leaves the blocks almost idle: make them matter
        for p in var.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return var


def first_token_fixed(var, start_B1C):
    """A pre-hook on block 0 that replaces token 0's input (the start token) by ``start_B1C``."""
    def hook(module, args):
        x = args[0].clone()
        x[:, :1] = start_B1C
        return (x, *args[1:])
    return var.blocks[0].register_forward_pre_hook(hook)


@pytest.mark.parametrize("adaln", [True, False])
def test_without_adaln_the_class_reaches_the_blocks_only_through_the_start_token(adaln):
    var = tiny_var(adaln=adaln)
    x_BLCv = torch.randn(2, var.L - 1, var.code_channels)
    labels_a, labels_b = torch.tensor([0, 1]), torch.tensor([3, 4])
    with torch.no_grad():
        assert not torch.allclose(var(labels_a, x_BLCv), var(labels_b, x_BLCv))  # the class matters either way
        handle = first_token_fixed(var, torch.randn(1, 1, var.width))
        fixed_a, fixed_b = var(labels_a, x_BLCv), var(labels_b, x_BLCv)
        handle.remove()
    # with the start token's input fixed, the label still acts through AdaLN, and only there
    assert torch.equal(fixed_a, fixed_b) != adaln
    if adaln:
        assert (fixed_a - fixed_b).abs().max() > 1e-3


def test_adaln_off_has_affine_layernorms_and_no_condition_projections():
    on, off = tiny_var(), tiny_var(adaln=False)
    names_off = {name for name, _ in off.named_parameters()}
    assert not any("ada_lin" in name for name in names_off)
    assert {"blocks.0.ln1.weight", "blocks.0.ln2.bias", "head_nm.weight", "head_nm.bias"} <= names_off
    C, depth = 64, 2
    adaln_params = depth * (C * 6 * C + 6 * C) + (C * 2 * C + 2 * C)
    layernorm_params = depth * 4 * C + 2 * C
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on) - count(off) == adaln_params - layernorm_params
    assert on.config["adaln"] and not off.config["adaln"]
    fresh = VAR(tiny_vae(), VARConfig(depth=2, num_classes=5, width=64, num_heads=2, adaln=False))
    assert torch.equal(fresh.blocks[1].ln2.weight, torch.ones(C)) and torch.equal(fresh.head_nm.bias, torch.zeros(C))


def test_adaln_off_rejects_shared_adaln_and_text():
    with pytest.raises(ValueError, match="adaln=False"):
        VAR(tiny_vae(), VARConfig(depth=2, num_classes=5, width=64, num_heads=2, adaln=False, shared_aln=True))
    text = dict(type="text", encoder=SmallTextEncoder(width=16, depth=1, num_heads=2, max_length=32).config)
    with pytest.raises(ValueError, match="adaln=False takes class conditioning"):
        VAR(tiny_vae(), VARConfig(depth=2, width=64, num_heads=2, adaln=False, conditioning=text))


def test_switches_are_saved_and_files_without_them_load_as_today(tmp_path):
    var = tiny_var(adaln=False, attn_l2_norm=False)
    varlib.save_var(var, tmp_path / "var.safetensors")
    loaded = varlib.load(tmp_path / "var.safetensors")
    assert not loaded.adaln and not loaded.config["attn_l2_norm"] and loaded.config == var.config
    assert torch.equal(loaded.generate([1, 2], seed=0), var.generate([1, 2], seed=0))
    # a file written before the switches existed: its config has no adaln key, the model has AdaLN
    today = tiny_var()
    config = {k: v for k, v in today.config.items() if k != "adaln"}
    old = VAR.from_config(config, today.state_dict(), vae=today.vae)
    assert old.adaln and torch.equal(old.generate([1, 2], seed=0), today.generate([1, 2], seed=0))


def test_raster_ar_takes_the_adaln_switch():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=(4,)).eval()
    ar = RasterAR(vae, VARConfig(depth=1, num_classes=5, width=64, num_heads=2, adaln=False, attn_l2_norm=False)).eval()
    assert not any("ada_lin" in name for name, _ in ar.named_parameters())
    tokens = ar.generate_tokens([0, 1], seed=0, cfg=0, top_k=0, top_p=0)
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        logits = ar(torch.tensor([0, 1]), tokens[:, :-1])
    assert logits.shape == (2, 16, 64)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_attention_normalisation_makes_attention_blind_to_the_scale_of_queries_and_keys(l2_norm):
    torch.manual_seed(0)
    attn = SelfAttention(64, 2, l2_norm=l2_norm).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        attn.q_bias.normal_()
        before = attn(x)
        attn.mat_qkv.weight[:128].mul_(3.0)  # q and k rows: 3x larger queries and keys
        attn.q_bias.mul_(3.0)
        after = attn(x)
    if l2_norm:  # unit queries and keys: only their directions count
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    else:  # logits 9x larger: a sharper softmax
        assert (after - before).abs().max() > 1e-2
        assert attn.scale == pytest.approx(0.25 / 32 ** 0.5) and not hasattr(attn, "scale_mul_1H11")


def test_sampling_rows_switch_off_filters_and_guidance():
    var = tiny_var(adaln=False)
    var.sampling = varlib.models.sampling.SamplingConfig(cfg=0.0, top_k=0, top_p=0.0)
    # guidance off: the null-class (or negative) branch never reaches the samples
    plain = var.generate_tokens([1, 2], seed=0)
    negative = var.generate_tokens([1, 2], seed=0, negative=[3, 4])
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, negative.tokens))
    guided = var.generate_tokens([1, 2], seed=0, cfg=4.0, negative=[3, 4])
    assert not all(torch.equal(a, b) for a, b in zip(plain.tokens, guided.tokens))
    # filters off: samples use tokens a tight top-k never draws
    many = var.generate_tokens(torch.zeros(64, dtype=torch.long), seed=0).tokens[-1]
    top1 = var.generate_tokens(torch.zeros(64, dtype=torch.long), seed=0, top_k=1).tokens[-1]
    assert many.unique().numel() > top1.unique().numel()
