"""Parity with the official implementation on the tiny bundles (tolerances from the bundles' README)."""

import pytest
import torch
import torch.nn.functional as F

from varlib.models.editing import keep_masks_per_scale
from varlib.models.sampling import TokenConstraint


def as_stored(bundle, img):
    """tiny10 stores output images average-pooled by 4."""
    return img if bundle["config"]["output_image_storage"] == "full" else F.avg_pool2d(img, 4)


def assert_tokens_equal(got, want):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"token map {k} differs in {(a != b).sum().item()} places"


def test_encoder_latent_and_tokens(tiny_models):
    vae, _, b = tiny_models
    vq = b["vq"]
    with torch.no_grad():
        f = vae.encode(b["images"])
    torch.testing.assert_close(f, vq["f_BChw"], atol=1e-5, rtol=0)
    assert_tokens_equal(vae.encode_tokens(b["images"]), vq["idx_Bl"])


def test_fhat_per_scale_and_reconstructions(tiny_models):
    vae, _, b = tiny_models
    vq = b["vq"]
    for got, want in zip(vae.encode_fhat_per_scale(b["images"]), vq["fhat_per_scale"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(as_stored(b, vae.decode_tokens(vq["idx_Bl"])), vq["recon_idxBl_to_img"], atol=1e-4, rtol=0)
    with torch.no_grad():
        from_fhat = vae.fhat_to_img(vq["fhat_per_scale"][-1])
    torch.testing.assert_close(as_stored(b, from_fhat), vq["recon_fhat_to_img"], atol=1e-4, rtol=0)


def test_teacher_forcing_input(tiny_models):
    vae, _, b = tiny_models
    got = vae.teacher_forcing_input(b["vq"]["idx_Bl"])
    assert got.shape == (2, b["config"]["L"] - 1, b["config"]["Cvae"])
    torch.testing.assert_close(got, b["vq"]["teacher_forcing_input"], atol=1e-5, rtol=0)


def test_vq_training_forward(tiny_models):
    vae, _, b = tiny_models
    quant = vae.quantize
    with torch.no_grad():
        out = quant(b["vq"]["f_BChw"])
    torch.testing.assert_close(out.vq_loss, b["vq"]["vq_forward_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(out.f_hat_st, b["vq"]["vq_forward_fhat"], atol=1e-5, rtol=0)
    assert_tokens_equal(out.tokens, b["vq"]["idx_Bl"])


def test_logits_and_loss(tiny_models):
    _, var, b = tiny_models
    ref = b["var_forward"]
    with torch.no_grad():
        logits = var(ref["forward_labels"], b["vq"]["teacher_forcing_input"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    ce_BL = F.cross_entropy(logits.flatten(0, 1), b["vq"]["gt_BL"].flatten(), reduction="none").view(2, -1)
    torch.testing.assert_close(ce_BL.mean(), ref["train_loss"], rtol=1e-5, atol=0)
    for k, sl in enumerate(b["config"]["begin_ends"]):
        torch.testing.assert_close(ce_BL[:, sl[0]:sl[1]].mean(), torch.tensor(ref["per_scale_ce"][k]), rtol=1e-5, atol=0)


def _sample(var, run, constraint=None, compile=False):
    kw = run["kwargs"]
    return var.generate_tokens(torch.tensor(kw["label_B"]), cfg=kw["cfg"], top_k=kw["top_k"], top_p=kw["top_p"],
                               seed=kw["g_seed"], more_smooth=kw["more_smooth"], constraint=constraint,
                               compile=compile)


def test_greedy_samples_with_and_without_guidance(tiny_models):
    vae, var, b = tiny_models
    for name in ("sample_greedy_cfg1p5", "sample_greedy_cfg0"):
        run = b["sampling"][name]
        out = _sample(var, run)
        assert_tokens_equal(out.tokens, run["idx_Bl"])
        torch.testing.assert_close(out.f_hat, run["f_hat_final"], atol=1e-5, rtol=0)
        img = var.generate(torch.tensor(run["kwargs"]["label_B"]), cfg=run["kwargs"]["cfg"], top_k=1, seed=0)
        torch.testing.assert_close(as_stored(b, img), run["img_01"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("compile", [False, "eager"])
def test_seeded_top_k_top_p_sample_is_token_exact(tiny_models, compile):
    """Also with every scale's step traced by torch.compile as one graph (fullgraph: no break allowed)."""
    _, var, b = tiny_models
    run = b["sampling"]["sample_seed0_cfg1p5_k50_p0p9"]
    assert_tokens_equal(_sample(var, run, compile=compile).tokens, run["idx_Bl"])


def test_guided_logits_of_first_scales(tiny_models):
    """The guidance ramp (1+t) cond - t uncond, t = cfg k/(K-1), checked on the raw logits."""
    _, var, b = tiny_models
    run = b["sampling"]["sample_greedy_cfg1p5"]
    seen = []
    original = var.get_logits

    def spy(h, cond):
        out = original(h, cond)
        seen.append(out.clone())
        return out

    var.get_logits = spy
    try:
        _sample(var, run)
    finally:
        del var.get_logits
    K, cfg = len(b["config"]["patch_nums"]), run["kwargs"]["cfg"]
    for k, want in enumerate(run["cfg_logits"]):
        t = cfg * k / (K - 1)
        got = (1 + t) * seen[k][:2] - t * seen[k][2:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_inpainting_is_token_exact(tiny_models):
    _, var, b = tiny_models
    run = b["sampling"]["inpaint_greedy_null_cfg3"]
    keep = [m.expand(2, -1, -1) for m in keep_masks_per_scale(run["edit_mask"], b["config"]["patch_nums"])]
    for got, want in zip(keep, run["force_gt_per_scale"]):
        assert torch.equal(got, want)
    out = _sample(var, run, TokenConstraint(b["vq"]["idx_Bl"], keep))
    assert_tokens_equal(out.sampled, run["idx_Bl_sampled"])
    assert_tokens_equal(out.tokens, run["idx_Bl_effective"])
    torch.testing.assert_close(out.f_hat, run["f_hat_final"], atol=1e-5, rtol=0)
