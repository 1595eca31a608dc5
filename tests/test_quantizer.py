"""varlib.models.quantizer: the official phi-sharing rule, training statistics and dead-code restarts."""

import torch

from varlib import MultiScaleVQVAE
from varlib.models.patch_schedules import PATCH_NUMS_512, phi_index_per_scale, sequence_length


def test_phi_index_rule_matches_official_table():
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_per_scale(4, 4) == [0, 1, 2, 3]
    assert phi_index_per_scale(10, 10) == list(range(10))
    assert sequence_length(PATCH_NUMS_512) == 2240


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
