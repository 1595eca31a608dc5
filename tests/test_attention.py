"""The exact block-sparse attention paths and activation checkpointing against the dense reference."""

import pytest
import torch
import torch.nn.functional as F

from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.attention import SMALL_SCALE_TOKENS, resolve_attn_impl, scale_groups
from varlib.models.patch_schedules import PATCH_NUMS_256, PATCH_NUMS_512, sequence_length

SCHEDULES = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}


@pytest.fixture(scope="module", params=[256, pytest.param(512, marks=pytest.mark.slow)])
def tiny_var(request) -> VAR:
    """A narrow, shallow VAR on the full 256 or 512 px schedule (random weights, seed 0)."""
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(ch=32, patch_nums=SCHEDULES[request.param]).requires_grad_(False)
    return VAR(vae, VARConfig(depth=2, width=64, num_heads=2, num_classes=10, drop_path_rate=0.0, cond_drop_rate=0.0))


def _inputs(var: VAR, length: int, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(var.num_classes, (batch,), generator=generator)
    x_BLCv = torch.randn(batch, length - 1, var.code_channels, generator=generator)
    targets = torch.randint(var.vocab_size, (batch, length), generator=generator)
    return labels, x_BLCv, targets


def _logits_and_grads(var: VAR, impl: str, labels, x_BLCv, targets):
    var.attn_impl = impl
    var.zero_grad(set_to_none=True)
    logits = var(labels, x_BLCv)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}


def _prefix_lengths(patch_nums) -> list[int]:
    """The full length and two progressive-training prefixes (first 4 and first K-2 scales)."""
    return [sequence_length(patch_nums), sequence_length(patch_nums[:4]), sequence_length(patch_nums[:-2])]


def test_prefix_attention_logits_and_gradients_equal_dense(tiny_var):
    tiny_var.train()
    for length in _prefix_lengths(tiny_var.patch_nums):
        inputs = _inputs(tiny_var, length)
        dense_logits, dense_grads = _logits_and_grads(tiny_var, "dense", *inputs)
        logits, grads = _logits_and_grads(tiny_var, "prefix", *inputs)
        assert logits.shape == (2, length, tiny_var.vocab_size)
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
        assert grads.keys() == dense_grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            scale = dense_grads[name].abs().max().clamp_min(1.0)
            assert (grad - dense_grads[name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_attention_logits_equal_dense_without_grad(tiny_var):
    """FlexAttention has no CPU backward: its forward is checked here, its gradients on CUDA (tests/gpu)."""
    tiny_var.eval()
    for length in _prefix_lengths(tiny_var.patch_nums):
        labels, x_BLCv, _ = _inputs(tiny_var, length)
        with torch.no_grad():
            tiny_var.attn_impl = "dense"
            dense = tiny_var(labels, x_BLCv)
            tiny_var.attn_impl = "flex"
            flex = tiny_var(labels, x_BLCv)
        torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)
    tiny_var.attn_impl = "auto"


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(ch=32, patch_nums=(1, 2, 3, 4)).requires_grad_(False)
    # label dropout and drop-path on: the recomputation must replay the same random draws
    config = VARConfig(depth=3, width=64, num_heads=2, num_classes=10, drop_path_rate=0.2, cond_drop_rate=0.5)
    var = VAR(vae, config).train()
    calls = []
    for block in var.blocks:
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    inputs = _inputs(var, var.L, batch=4)
    results = []
    for checkpointing in (False, True):
        var.activation_checkpointing = checkpointing
        calls.clear()
        torch.manual_seed(3)
        results.append(_logits_and_grads(var, "prefix", *inputs))
        assert len(calls) == var.depth * (2 if checkpointing else 1)  # recomputed in the backward
    (plain_logits, plain_grads), (ckpt_logits, ckpt_grads) = results
    torch.testing.assert_close(ckpt_logits, plain_logits, rtol=0, atol=0)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # no recomputation outside training with gradients
    calls.clear()
    with torch.no_grad():
        var(*inputs[:2])
    assert len(calls) == var.depth


def test_scale_groups_cover_the_sequence_and_group_only_small_scales():
    assert scale_groups(PATCH_NUMS_256, 680) == [(0, 91), (91, 155), (155, 255), (255, 424), (424, 680)]
    for patch_nums in SCHEDULES.values():
        for length in _prefix_lengths(patch_nums):
            groups = scale_groups(patch_nums, length)
            assert groups[0][0] == 0 and groups[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
            starts = [sequence_length(patch_nums[:k]) for k in range(len(patch_nums) + 1)]
            assert all(a in starts and b in starts for a, b in groups)  # on scale boundaries
            for a, b in groups:  # a group of several scales only gathers small ones
                sizes = [pn * pn for pn, start in zip(patch_nums, starts) if a <= start < b]
                assert len(sizes) == 1 or max(sizes) < SMALL_SCALE_TOKENS


def test_attn_impl_selection_and_bad_values():
    assert resolve_attn_impl("auto", torch.device("cpu")) == "prefix"
    assert resolve_attn_impl("dense", torch.device("cpu")) == "dense"
    assert resolve_attn_impl("auto", torch.device("cuda"), attn_dropout=True) == "prefix"
    with pytest.raises(ValueError, match="attention dropout"):
        resolve_attn_impl("flex", torch.device("cpu"), attn_dropout=True)
    vae = MultiScaleVQVAE(ch=32, patch_nums=(1, 2))
    with pytest.raises(ValueError, match=r"attn_impl must be one of .*'sparse'"):
        VAR(vae, VARConfig(depth=1, width=32, num_heads=1, num_classes=2), attn_impl="sparse")
