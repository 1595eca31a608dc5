"""The fast, approximate sampling options (cfg_until, draft, prune, stop_after): their neutral values sample exactly
what the exact sampler samples, and each changes what it should and only that."""

import copy

import pytest
import torch

from varlib import VAR, VARConfig
from varlib.models.sampling import PRUNED_SCALES, Draft, SamplingConfig

LABELS = torch.tensor([3, 7, 1])
SAMPLING = dict(cfg=4.0, top_k=0, top_p=0.0, seed=5)  # strong guidance, no filter: the options show


def tokens_of(var, **options):
    return var.generate_tokens(LABELS, **{**SAMPLING, **options})


def assert_same(a, b):
    assert len(a.tokens) == len(b.tokens)
    for x, y in zip(a.tokens, b.tokens):
        assert torch.equal(x, y)
    assert torch.equal(a.f_hat, b.f_hat)


def differs(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model(tiny_models):
    """The tiny official model with a class embedding strong enough for guidance to change the draws."""
    _, var, _ = tiny_models
    strong = copy.deepcopy(var)
    with torch.no_grad():
        strong.class_emb.weight.mul_(30)
    return strong


@pytest.fixture(scope="module")
def drafter(model):
    """A deeper random VAR on the same tokenizer: the draft model."""
    torch.manual_seed(0)
    return VAR(model.vae, VARConfig(depth=3, num_classes=model.num_classes, width=128, num_heads=2)).eval()


def test_neutral_values_sample_exactly_the_exact_sampler(model, drafter):
    var = model
    K = len(var.patch_nums)
    exact = tokens_of(var)
    for options in (dict(cfg_until=K), dict(cfg_until=K + 5), dict(prune=1.0), dict(stop_after=K),
                    dict(draft=Draft(drafter, 0)), dict(cfg_until=K, prune=1.0, stop_after=K, draft=Draft(drafter, 0))):
        assert_same(tokens_of(var, **options), exact)


def test_cfg_until_guides_the_first_scales_only(model):
    var = model
    K = len(var.patch_nums)
    exact, unguided = tokens_of(var), tokens_of(var, cfg=0.0)
    for n in range(1, K):
        fast = tokens_of(var, cfg_until=n)
        for k in range(n):  # the same guided scales, the same draws
            assert torch.equal(fast.tokens[k], exact.tokens[k])
        assert differs(fast.tokens[n:], exact.tokens[n:])
    # no guided scale at all: the unguided sampler itself (the unconditional half is never computed)
    assert_same(tokens_of(var, cfg_until=0), unguided)


def test_stop_after_samples_the_first_scales_and_decodes_what_they_built(model):
    var = model
    exact = tokens_of(var)
    quantize, pns = var.vae.quantize, var.patch_nums
    for n in range(1, len(pns)):
        fast = tokens_of(var, stop_after=n)
        assert len(fast.tokens) == n
        f_hat = torch.zeros_like(exact.f_hat)
        for k in range(n):
            assert torch.equal(fast.tokens[k], exact.tokens[k])
            f_hat, _ = quantize.accumulate(f_hat, quantize.embed(exact.tokens[k], pns[k]).float(), k, pns)
        torch.testing.assert_close(fast.f_hat, f_hat, atol=1e-6, rtol=0)
        assert not torch.allclose(fast.f_hat, exact.f_hat)
    image = var.generate(LABELS, **SAMPLING, stop_after=1)
    torch.testing.assert_close(image, var.vae.fhat_to_img(tokens_of(var, stop_after=1).f_hat).add(1).mul(0.5))
    with pytest.raises(ValueError, match=rf"stop_after must be in \[1, {len(pns)}\]"):
        tokens_of(var, stop_after=len(pns) + 1)


def test_drafting_with_the_model_itself_reproduces_the_exact_samples(model):
    """The one block-causal prefill of the drafted scales fills the KV cache as scale-by-scale sampling does."""
    var = model
    exact = tokens_of(var)
    for n in range(1, len(var.patch_nums) + 1):
        fast = tokens_of(var, draft=Draft(var, n))
        for x, y in zip(fast.tokens, exact.tokens):
            assert torch.equal(x, y)
        torch.testing.assert_close(fast.f_hat, exact.f_hat, atol=1e-5, rtol=0)


def test_draft_samples_the_first_scales_with_the_draft_model(model, drafter):
    var = model
    K = len(var.patch_nums)
    exact, drafter_exact = tokens_of(var), tokens_of(drafter)
    for n in range(1, K):
        fast = tokens_of(var, draft=Draft(drafter, n))
        for k in range(n):
            assert torch.equal(fast.tokens[k], drafter_exact.tokens[k])
        assert differs(fast.tokens, exact.tokens) and differs(fast.tokens, drafter_exact.tokens)
    assert_same(tokens_of(var, draft=Draft(drafter, K)), drafter_exact)
    # guidance stops during the drafted scales: the refiner then runs without the unconditional half
    both = tokens_of(var, draft=Draft(drafter, 2), cfg_until=1)
    assert torch.equal(both.tokens[0], drafter_exact.tokens[0])


def test_draft_needs_the_same_tokenizer_and_a_scale_count(model, drafter):
    var = model
    other = VAR(var.vae, VARConfig(depth=1, num_classes=var.num_classes, width=64, num_heads=1,
                patch_nums=(1,) + tuple(p + 1 for p in var.patch_nums[1:]))).eval()
    with pytest.raises(ValueError, match="share the tokenizer and schedule"):
        tokens_of(var, draft=Draft(other, 1))
    with pytest.raises(ValueError, match=r"draft.scales must be an integer in \[0, "):
        tokens_of(var, draft=Draft(drafter, len(var.patch_nums) + 1))


def test_prune_changes_the_last_scales_only(model):
    var = model
    K = len(var.patch_nums)
    first_pruned = max(1, K - PRUNED_SCALES)
    exact = tokens_of(var)
    for keep in (0.5, 0.01):
        fast = tokens_of(var, prune=keep)
        for k in range(first_pruned):
            assert torch.equal(fast.tokens[k], exact.tokens[k])
        assert differs(fast.tokens[first_pruned:], exact.tokens[first_pruned:])
    # pruning composes with dropping guidance between two pruned scales
    assert len(tokens_of(var, prune=0.5, cfg_until=K - 1).tokens) == K


@pytest.mark.parametrize("bad", [dict(prune=0.0), dict(prune=1.5), dict(cfg_until=-1), dict(stop_after=0),
                                 dict(cfg_until=1.5), dict(prune="a lot")])
def test_bad_fast_options_raise_naming_the_ranges(model, bad):
    var = model
    with pytest.raises(ValueError, match=f"{next(iter(bad))}"):
        tokens_of(var, **bad)


def test_sampling_config_resolves_every_setting_in_one_place():
    own = SamplingConfig(cfg=2.0, top_k=50, top_p=0.75, stop_after=6)
    assert own.resolve() == dict(cfg=2.0, top_k=50, top_p=0.75, cfg_until=None, prune=1.0, stop_after=6)
    assert own.resolve(cfg=3, top_k="20", prune="0.5", stop_after=None) == dict(
        cfg=3.0, top_k=20, top_p=0.75, cfg_until=None, prune=0.5, stop_after=6)
    assert SamplingConfig.from_dict({"cfg_until": 4, "prune": None}) == SamplingConfig(cfg_until=4)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        own.resolve(top_k=2.5)
    with pytest.raises(ValueError, match=r"unknown keys \['draft'\]"):
        SamplingConfig.from_dict({"draft": 3})


def test_model_sampling_supplies_the_fast_options(model):
    var = model
    own, var.sampling = var.sampling, SamplingConfig(cfg=4.0, top_k=0, top_p=0.0, stop_after=2)
    try:
        assert len(var.generate_tokens(LABELS, seed=5).tokens) == 2
        assert len(var.generate_tokens(LABELS, seed=5, stop_after=3).tokens) == 3
    finally:
        var.sampling = own

