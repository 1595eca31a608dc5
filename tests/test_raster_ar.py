"""The raster-scan next-token baseline: causal mask, KV-cache decoding, guidance/filters, parameters shared with
VAR, file round trip, the Lightning module on a single-scale token cache, and `varlib-train experiment=ar_emoji`."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers.commands import run_in_process
from helpers.runs import untrained_validation
from helpers.token_caches import tokenize_to_cache

import varlib
from varlib.data.token_cache import TokenCacheDataModule
from varlib.models.raster_ar import RasterAR
from varlib.models.sampling import SamplingConfig
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.raster_ar_module import RasterARModule

ROOT = Path(__file__).resolve().parents[1]
SIDE = 4
TINY_AR = dict(depth=2, num_classes=3, width=32, num_heads=2)


def single_scale_vae(seed=0, patch_nums=(SIDE,)) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    return MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=patch_nums,
                           share_quant_resi=1, using_sa=False, using_mid_sa=False, norm_groups=8).eval()


def tiny_ar(seed=0, **kwargs) -> RasterAR:
    vae = single_scale_vae(seed)
    torch.manual_seed(seed)
    model = RasterAR(vae, varlib.VARConfig(**{**TINY_AR, **kwargs})).eval()
    with torch.no_grad():  # the official init zeroes AdaLN gammas to 1e-5: make every path count in the tests
        for block in model.blocks:
            block.ada_lin[-1].weight.normal_(0, 0.05)
        model.head.weight.normal_(0, 0.5)
    return model


def full_recompute_greedy(model: RasterAR, labels_B: torch.Tensor, cfg: float) -> torch.Tensor:
    """Greedy decoding that reruns the whole prefix through the causal forward at every step (no cache)."""
    B = labels_B.shape[0]
    tokens = torch.zeros(B, 0, dtype=torch.long)
    null = torch.full_like(labels_B, model.num_classes)
    for _ in range(model.L):
        logits = model(labels_B, tokens)[:, -1]
        if cfg:
            logits = (1 + cfg) * logits - cfg * model(null, tokens)[:, -1]
        tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
    return tokens


def test_a_change_at_position_t_leaves_earlier_logits_unchanged():
    model = tiny_ar()
    labels = torch.tensor([0, 2])
    tokens = torch.randint(0, 16, (2, model.L - 1), generator=torch.Generator().manual_seed(1))
    logits = model(labels, tokens)
    assert logits.shape == (2, model.L, 16)
    for t in (0, 5, model.L - 2):  # input t feeds position t+1, which predicts token t+1
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 7) % 16
        new = model(labels, changed)
        torch.testing.assert_close(new[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
        assert (new[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4  # the change is seen from t+1 on


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_kv_cache_greedy_decode_equals_full_recompute(cfg):
    model = tiny_ar()
    labels = torch.tensor([0, 1, 2])
    cached = model.generate_tokens(labels, cfg=cfg, top_k=1, seed=0)
    reference = full_recompute_greedy(model, labels, cfg)
    assert cached.shape == (3, model.L) and cached.dtype == torch.long
    assert torch.equal(cached, reference)
    assert len(set(map(tuple, cached.tolist()))) > 1  # the classes decode differently


def test_sampling_filters_guidance_and_seeds():
    model = tiny_ar()
    probs = model(torch.tensor([1]), torch.zeros(1, 0, dtype=torch.long))[0, 0].softmax(-1)
    allowed = set(probs.topk(3).indices.tolist())
    first = model.generate_tokens(1, batch_size=64, top_k=3, cfg=0.0, seed=0)[:, 0]
    assert set(first.tolist()) <= allowed and len(set(first.tolist())) > 1
    nucleus = model.generate_tokens(1, batch_size=64, top_p=1e-6, cfg=0.0, seed=0)[:, 0]
    assert set(nucleus.tolist()) == {int(probs.argmax())}  # a tiny nucleus keeps only the largest
    guided = model.generate_tokens([0, 2], cfg=1.5, top_k=5, top_p=0.9, seed=3)
    assert torch.equal(guided, model.generate_tokens([0, 2], cfg=1.5, top_k=5, top_p=0.9, seed=3))
    assert not torch.equal(guided, model.generate_tokens([0, 2], cfg=1.5, top_k=5, top_p=0.9, seed=4))
    images = model.generate([0, 2], cfg=1.5, seed=0)
    assert images.shape == (2, 3, SIDE * 2, SIDE * 2) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="labels must lie in"):
        model.generate_tokens([5])
    with pytest.raises(ValueError, match="top_p in"):
        model.generate_tokens([0], top_p=2.0)


def test_same_blocks_and_non_embedding_parameters_as_var():
    ar = tiny_ar()
    var = varlib.VAR(single_scale_vae(patch_nums=(1, 2, SIDE)), varlib.VARConfig(**TINY_AR))
    assert ar.num_non_embedding_params() == var.num_non_embedding_params()
    block_shapes = lambda m: {k: v.shape for k, v in m.blocks.state_dict().items()}  # noqa: E731
    assert block_shapes(ar) == block_shapes(var)
    assert ar.flops_per_token() == 6 * ar.num_non_embedding_params() + 12 * 2 * 32 * (ar.L + 1) / 2
    with pytest.raises(ValueError, match="single-scale tokenizer"):
        RasterAR(var.vae, varlib.VARConfig(**TINY_AR))
    with pytest.raises(ValueError, match="RasterAR takes neither shared_aln, conditioning nor another patch_nums"):
        RasterAR(ar.vae, varlib.VARConfig(**TINY_AR, shared_aln=True))
    with pytest.raises(ValueError, match="l <= L-1"):
        ar(torch.tensor([0]), torch.zeros(1, ar.L, dtype=torch.long))


def test_file_round_trip_restores_the_model(tmp_path):
    model = tiny_ar()
    varlib.save_var(model, tmp_path / "ar.safetensors")
    loaded = varlib.load(tmp_path / "ar.safetensors")
    assert isinstance(loaded, RasterAR) and loaded.config == model.config
    assert torch.equal(loaded.generate_tokens([0, 1], seed=0), model.generate_tokens([0, 1], seed=0))



def test_sampling_settings_fill_generate_and_travel_with_pretrained_folders(tmp_path):
    model = tiny_ar()
    model.sampling = SamplingConfig(cfg=2.0, top_k=3, top_p=0.5)
    explicit = model.generate([0, 2], cfg=2.0, top_k=3, top_p=0.5, seed=1)
    assert torch.equal(model.generate([0, 2], seed=1), explicit)
    assert not torch.equal(model.generate([0, 2], cfg=0.0, seed=1), explicit)
    loaded = RasterAR.from_pretrained(model.save_pretrained(tmp_path / "ar"))
    assert loaded.sampling == model.sampling and loaded.config == model.config
    assert torch.equal(loaded.generate([0, 2], seed=1), explicit)
    with pytest.raises(ValueError, match="expected a RasterAR"):
        RasterAR.from_pretrained(single_scale_vae().save_pretrained(tmp_path / "tok"))


def test_module_carries_sampling_settings_and_refuses_var_only_options():
    module = RasterARModule(var=TINY_AR, vae=single_scale_vae(), sampling={"cfg": 3.0, "top_k": 5})
    assert module.transformer is module.ar and module.ar.sampling == SamplingConfig(cfg=3.0, top_k=5)  # top_p: the default
    with module.full_weights() as plain:  # unsharded: the module's own transformer
        assert plain is module.ar
    with pytest.raises(TypeError, match="activation_checkpointing"):
        RasterARModule(var=TINY_AR, vae=single_scale_vae(), activation_checkpointing=True)
    with pytest.raises(ValueError, match="grid_classes"):
        RasterARModule(var=TINY_AR, vae=single_scale_vae(), grid_classes=-1)
    with pytest.raises(ValueError, match=r"unknown model.loss keys \['progressive_fraction'\]"):
        RasterARModule(var=TINY_AR, vae=single_scale_vae(), loss=dict(progressive_fraction=0.5))


def test_module_learns_from_a_single_scale_token_cache_and_exports(tmp_path):
    vae = single_scale_vae()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 3, 2 * SIDE, 2 * SIDE, generator=g) * 2 - 1, torch.arange(24) % 3
    tokenize_to_cache(vae, [(images[:16], labels[:16])], tmp_path / "cache", "train", num_classes=3)
    tokenize_to_cache(vae, [(images[16:], labels[16:])], tmp_path / "cache", "val", num_classes=3)
    data = TokenCacheDataModule(str(tmp_path / "cache"), batch_size=8)
    assert data.patch_nums == (SIDE,)
    module = RasterARModule(var=TINY_AR, vae=vae, optim=dict(lr=0.0625, warmup_fraction=0.1), ema_decay=0.5)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    train_only = trainer.validate(module, dataloaders=data.train_dataloader(), verbose=False)[0]
    assert before["val/loss_avg"] == pytest.approx(before["val/loss_last"])  # one scale
    assert train_only["val/loss_avg"] < 0.7 * before["val/loss_avg"]  # it fits the 16 training images
    module.export(tmp_path / "ar.safetensors")
    assert isinstance(varlib.load(tmp_path / "ar.safetensors"), RasterAR)


def test_module_rejects_a_multi_scale_cache(tmp_path):
    vae = single_scale_vae(patch_nums=(1, 2, SIDE))
    tokenize_to_cache(vae, [(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))], tmp_path, "train", num_classes=3)
    module = RasterARModule(var=TINY_AR, vae=single_scale_vae())
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"data patch_nums \(1, 2, 4\) does not match the model's \(4,\)"):
        trainer.fit(module, datamodule=TokenCacheDataModule(str(tmp_path), batch_size=2))


@pytest.mark.slow
def test_training_through_the_cli_improves_on_the_untrained_model(tmp_path):
    """12 steps of `varlib-train experiment=ar_emoji` on 8 images (validated on the same 8): the final validation
    loss is well below the same model's before training (same config and seed, built as the run builds it)."""
    vae = single_scale_vae()
    varlib.save_tokenizer(vae, tmp_path / "tok.safetensors")
    images, labels = torch.rand(8, 3, 8, 8) * 2 - 1, torch.arange(8) % 3
    for split in ("train", "val"):
        tokenize_to_cache(vae, [(images, labels)], tmp_path / "cache", split, num_classes=3)
    overrides = [
        "experiment=ar_emoji", f"paths.output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'cache'}",
        f"model.tokenizer_path={tmp_path / 'tok.safetensors'}", "data.batch_size=4", "model.var.depth=2",
        "model.var.num_classes=3", "model.var.width=32", "model.var.num_heads=2", "model.optim.lr=0.0625",
        "model.optim.warmup_fraction=0.1", "trainer.max_steps=12", "trainer.max_time=null",
        "trainer.val_check_interval=12", "trainer.num_sanity_val_steps=0", "logger=csv",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "cpu_threads=1",
    ]
    result = run_in_process([sys.executable, "-m", "varlib.cli.train", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((tmp_path / "run" / "metrics.json").read_text())["val/loss_avg"]

    before = untrained_validation(overrides)["val/loss_avg"]
    assert after < before - 0.3, (before, after)
    model = varlib.load(tmp_path / "run" / "model.safetensors")
    assert isinstance(model, RasterAR) and model.generate_tokens([0], seed=0).shape == (1, SIDE * SIDE)
