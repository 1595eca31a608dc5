"""TokenizerModule: loss terms, GAN schedule, validation metrics, EMA, code restarts, checkpoints and export.

Everything runs on a tiny tokenizer (ch 32, V 64, 32 px, 8x8 latent) and random images.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.image import structural_similarity_index_measure

import varlib
from varlib.training.settings import OptimConfig, TokenizerLossConfig
from varlib.training.tokenizer_loss import autoencoder_loss
from varlib.training.tokenizer_module import TokenizerModule

TINY_VAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, patch_nums=[1, 2, 4, 8])
IMAGE_SIZE = 32


class RandomImages(L.LightningDataModule):
    """Uniform noise images in [-1, 1] with zero labels; batches (images (B,3,S,S), labels (B,))."""

    def __init__(self, image_size: int = IMAGE_SIZE, num_train: int = 16, num_val: int = 8, batch_size: int = 4):
        super().__init__()
        self.image_size = image_size
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(0)
        self.train_images = torch.rand(num_train, 3, image_size, image_size, generator=generator) * 2 - 1
        self.val_images = torch.rand(num_val, 3, image_size, image_size, generator=generator) * 2 - 1

    def _loader(self, images: torch.Tensor, shuffle: bool) -> DataLoader:
        labels = torch.zeros(len(images), dtype=torch.long)
        return DataLoader(TensorDataset(images, labels), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_images, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_images, shuffle=False)


def make_module(tmp_path, **kwargs) -> TokenizerModule:
    """Tiny module; LPIPS (random trunk) and the GAN are off unless kwargs turn them on."""
    options = dict(
        vae=TINY_VAE,
        loss=dict(lpips_weight=0.0, disc_weight=0.0),
        perceptual=dict(vgg_weights_path=str(tmp_path / "no_vgg.pth"), allow_random_backbone=True),
        discriminator=dict(base_channels=16, n_layers=2),
        optim=dict(lr=1e-3, warmup_steps=0),
    )
    options.update(kwargs)
    torch.manual_seed(0)
    return TokenizerModule(**options)


def make_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def clone_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


# ------------------------------------------------------------------------------------------------ loss terms


@pytest.mark.slow  # builds the LPIPS VGG16 (about 10 s)
def test_every_loss_term_is_positive_and_reaches_its_parameters(tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised LPIPS"):
        module = make_module(tmp_path, loss=dict(lpips_weight=1.0, disc_weight=0.5, disc_start_step=0))
    vae = module.vae
    img = RandomImages().train_images[:4]
    recon, quant = vae(img)
    parts = autoencoder_loss(
        img, recon, quant.vq_loss, module.loss_config, module.perceptual, module.discriminator,
        vae.decoder.last_layer_weight, gan_factor=1.0,
    )
    for name in ("rec", "vq", "lpips", "gan_weight", "total"):
        assert math.isfinite(parts[name].item()) and parts[name].item() > 0, name
    assert math.isfinite(parts["gan_g"].item()) and parts["gan_g"].item() != 0

    encoder_w, decoder_w = vae.encoder.conv_in.weight, vae.decoder.last_layer_weight
    codebook = vae.quantize.embedding.weight
    disc_w = next(module.discriminator.parameters())

    def grad_norms(term: str) -> list[float]:
        grads = torch.autograd.grad(parts[term], [encoder_w, decoder_w, codebook, disc_w], retain_graph=True, allow_unused=True)
        return [0.0 if g is None else g.norm().item() for g in grads]

    enc, dec, code, disc = grad_norms("rec")
    assert enc > 0 and dec > 0 and code == 0  # straight-through: the codebook learns from the VQ loss only
    enc, dec, code, _ = grad_norms("vq")
    assert enc > 0 and code > 0 and dec == 0
    enc, dec, _, _ = grad_norms("lpips")
    assert enc > 0 and dec > 0
    enc, dec, _, disc = grad_norms("gan_g")
    assert enc > 0 and dec > 0 and disc > 0  # the autoencoder's step toggles the discriminator off itself

    # One real optimisation step of the whole objective moves the autoencoder and the discriminator, not LPIPS.
    vae_before, disc_before = clone_params(vae), clone_params(module.discriminator)
    lpips_before = clone_params(module.perceptual)
    make_trainer(tmp_path, max_steps=2).fit(module, datamodule=RandomImages())
    assert changed(vae_before, vae) == set(vae_before)
    assert changed(disc_before, module.discriminator) == set(disc_before)
    assert not changed(lpips_before, module.perceptual)


class BatchCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1


@pytest.mark.parametrize("max_steps, disc_moves", [(2, False), (4, True)])
def test_discriminator_starts_at_its_configured_step(tmp_path, max_steps, disc_moves):
    module = make_module(tmp_path, loss=dict(lpips_weight=0.0, disc_weight=0.5, disc_start_step=2))
    vae_before, disc_before = clone_params(module.vae), clone_params(module.discriminator)
    counter = BatchCounter()
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=[counter])
    trainer.fit(module, datamodule=RandomImages())

    assert changed(vae_before, module.vae) == set(vae_before)
    assert bool(changed(disc_before, module.discriminator)) == disc_moves
    disc_optimizer = trainer.optimizers[1]
    assert (len(disc_optimizer.state) > 0) == disc_moves
    assert ("train/disc" in trainer.callback_metrics) == disc_moves
    # Before the start step one optimiser step per batch, after it two (the discriminator's counts too).
    assert trainer.global_step == max_steps
    assert counter.batches == (2 if not disc_moves else 3)


def test_learning_rate_follows_the_schedule_during_training(tmp_path):
    module = make_module(tmp_path, optim=dict(lr=1e-3, warmup_steps=4))
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=RandomImages())
    # Step 1 (0-based) is the last one taken: 2/4 of the base rate.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(0.5e-3)


def test_decay_by_time_reads_the_trainers_max_time(tmp_path):
    module = make_module(tmp_path, optim=dict(lr=1e-3, warmup_steps=0, decay="cosine", decay_by_time=True))
    trainer = make_trainer(tmp_path, max_steps=3, max_time={"hours": 1})
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    timer.time_elapsed = lambda stage="train": 2700.0  # three quarters of the hour gone at every step
    trainer.fit(module, datamodule=RandomImages())
    # The last step (2 of 3) is behind the clock: the time's share sets the rate.
    assert trainer.global_step == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_decay_by_time_without_max_time_follows_the_steps(tmp_path):
    module = make_module(tmp_path, optim=dict(lr=1e-3, warmup_steps=0, decay="cosine", decay_by_time=True))
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=RandomImages())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(2 / 3 * math.pi)))


def test_decay_by_time_resumes_with_the_checkpoints_clock(tmp_path):
    """A resumed run's clock continues from the Timer state in the checkpoint (wall time: close, not exact)."""
    options = dict(optim=dict(lr=1e-3, warmup_steps=0, decay="cosine", decay_by_time=True))
    trainer = make_trainer(tmp_path, max_steps=2, max_time={"hours": 1})
    trainer.fit(make_module(tmp_path, **options), datamodule=RandomImages())
    path = tmp_path / "timed.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"] = 2700.0  # as if killed after 45 minutes
    torch.save(checkpoint, path)

    resumed = make_trainer(tmp_path, max_steps=3, max_time={"hours": 1})
    resumed.fit(make_module(tmp_path, **options), datamodule=RandomImages(), ckpt_path=path, weights_only=True)
    assert resumed.global_step == 3
    # step 2 of 3 (2/3 of the steps) behind the clock's 3/4: the time's share sets the rate
    want = 1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi))
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(want, rel=0.02)


# ------------------------------------------------------------------------------------------------ validation


def test_validation_logs_psnr_ssim_and_codebook_usage_over_the_whole_set(tmp_path):
    module = make_module(tmp_path)
    data = RandomImages(num_val=8, batch_size=4)
    results = make_trainer(tmp_path, max_steps=1, limit_val_batches=None).validate(module, datamodule=data, verbose=False)[0]
    assert {"val/psnr", "val/ssim", "val/codebook_usage", "val/rec_loss"} <= set(results)
    assert "val/lpips" not in results  # only a pretrained VGG gives a meaningful LPIPS

    vae = module.vae.eval()
    with torch.no_grad():
        recon = torch.cat([vae(x)[0] for x in data.val_images.split(4)]).clamp(-1, 1)
        tokens = torch.cat([vae.encode_tokens(x)[-1] for x in data.val_images.split(4)])
    mse_B = ((recon + 1) / 2 - (data.val_images + 1) / 2).pow(2).flatten(1).mean(1)
    assert results["val/psnr"] == pytest.approx((10 * torch.log10(1 / mse_B)).mean().item(), abs=1e-3)
    want_ssim = structural_similarity_index_measure((recon + 1) / 2, (data.val_images + 1) / 2, data_range=1.0)
    assert results["val/ssim"] == pytest.approx(want_ssim.item(), abs=1e-5)
    assert results["val/codebook_usage"] == pytest.approx(tokens.unique().numel() / TINY_VAE["vocab_size"])


# ------------------------------------------------------------------------------------------------ codebook restarts


def test_dead_code_restart_reseeds_codes_from_latents(tmp_path):
    module = make_module(tmp_path, dead_code_restart_every=1, dead_code_min_hits=1e9)  # every code counts as dead
    trainer = make_trainer(tmp_path, max_steps=1)
    data = RandomImages(num_train=4, batch_size=4)
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["train/dead_codes_restarted"].item() == TINY_VAE["vocab_size"]
    # Every code now sits next to one latent vector of the batch (the restart adds 1% noise).
    with torch.no_grad():
        latents_NC = module.vae.encode(data.train_images).permute(0, 2, 3, 1).reshape(-1, TINY_VAE["z_channels"])
    codebook_VC = module.vae.quantize.embedding.weight.detach()
    nearest = torch.cdist(codebook_VC, latents_NC).min(dim=1).values
    assert nearest.max() < 0.05 * latents_NC.std() * math.sqrt(TINY_VAE["z_channels"])


# ------------------------------------------------------------------------------------------------ export, checkpoints, EMA


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_export_round_trips_through_varlib_load(tmp_path):
    module = make_module(tmp_path)
    make_trainer(tmp_path, max_steps=1).fit(module, datamodule=RandomImages())
    path = module.export(tmp_path / "out" / "tokenizer.safetensors")
    loaded = varlib.load(path)
    assert isinstance(loaded, varlib.MultiScaleVQVAE) and loaded.config == module.vae.config
    _assert_same_weights(loaded, module.vae)
    img = RandomImages().val_images[:2]
    module.vae.eval()
    assert torch.equal(loaded.decode_tokens(loaded.encode_tokens(img)), module.vae.decode_tokens(module.vae.encode_tokens(img)))


def test_channels_last_computes_like_the_default_layout_and_exports_plain_weights(tmp_path):
    vae = dict(TINY_VAE, norm_groups=8)
    default, nhwc = (make_module(tmp_path, vae=vae, channels_last=flag) for flag in (False, True))
    conv = nhwc.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    img = RandomImages().train_images[:4]
    for module in (default, nhwc):
        recon, quant = module.vae(img)
        (recon.square().mean() + quant.vq_loss).backward()
    torch.testing.assert_close(nhwc.vae(img)[0], default.vae(img)[0], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(default.vae.named_parameters(), nhwc.vae.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)

    make_trainer(tmp_path, max_steps=2).fit(nhwc, datamodule=RandomImages())
    loaded = varlib.load(nhwc.export(tmp_path / "nhwc.safetensors"))
    assert loaded.config["norm_groups"] == 8
    _assert_same_weights(loaded, nhwc.vae)


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


@pytest.mark.slow  # builds the LPIPS VGG16 twice (about 10 s)
def test_checkpoint_loads_weights_only_and_opens_with_varlib_load(tmp_path):
    # Configs arriving as OmegaConf containers must still be saved as plain containers.
    loss = OmegaConf.create(dict(lpips_weight=1.0, disc_weight=0.5, disc_start_step=0))
    with pytest.warns(UserWarning, match="randomly initialised LPIPS"):
        module = make_module(tmp_path, loss=loss)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=RandomImages())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert _plain(checkpoint["hyper_parameters"]) and checkpoint["hyper_parameters"]["vae"]["vocab_size"] == 64
    assert not [k for k in checkpoint["state_dict"] if k.startswith("perceptual.")]  # LPIPS is rebuilt, not saved
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])
    _assert_same_weights(varlib.load(path), module.vae)

    with pytest.warns(UserWarning, match="randomly initialised LPIPS"):
        reloaded = TokenizerModule.load_from_checkpoint(path, weights_only=True)
    _assert_same_weights(reloaded.vae, module.vae)
    _assert_same_weights(reloaded.discriminator, module.discriminator)


def test_ema_weights_are_validated_exported_and_resumed(tmp_path):
    module = make_module(tmp_path, ema_decay=0.5, ema_warmup=False)
    data = RandomImages()
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=None)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    online = clone_params(module.vae)
    exported = varlib.load(module.export(tmp_path / "ema.safetensors"))
    assert not torch.equal(exported.decoder.conv_out.weight, module.vae.decoder.conv_out.weight)
    _assert_same_weights(varlib.load(path), exported)  # varlib.load of the checkpoint gives the EMA weights too
    assert not changed(online, module.vae)  # exporting swapped the EMA weights back out
    # One EMA convention: the checkpoint's vae.* hold the online weights, the averages sit beside them.
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["vae.decoder.conv_out.weight"], online["decoder.conv_out.weight"])
    _assert_same_weights(varlib.load(path, ema=False), module.vae)

    # Validation sees the EMA weights.
    results = trainer.validate(module, datamodule=data, verbose=False)[0]
    with torch.no_grad():
        recon = exported(data.val_images)[0].clamp(-1, 1)
    mse_B = ((recon - data.val_images) / 2).pow(2).flatten(1).mean(1)
    assert results["val/psnr"] == pytest.approx((10 * torch.log10(1 / mse_B)).mean().item(), abs=1e-3)

    # Resuming restores the online weights into vae and the averages into the EMA.
    resumed = TokenizerModule.load_from_checkpoint(path, weights_only=True)
    assert not changed(online, resumed.vae)
    for name, value in module.ema.shadow_params.items():
        assert torch.equal(resumed.ema.shadow_params[name], value), name
    assert resumed.ema.num_updates == module.ema.num_updates == 3
    # The quantizer's update count (non-persistent, left out of its state dict) resumes too: it sets the momentum.
    assert int(resumed.vae.quantize.num_updates) == int(module.vae.quantize.num_updates) == 3


# ------------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss=dict(lpips_weight=-1.0)), r"loss.lpips_weight must be >= 0, got -1.0"),
        (dict(loss=dict(l2_weight=0.0)), r"l2_weight or loss.l1_weight must be > 0"),
        (dict(loss=dict(gan_weight=1.0)), r"unknown model.loss keys \['gan_weight'\]"),
        (dict(loss=dict(disc_loss="wgan")), r"disc_loss must be one of \['hinge', 'vanilla'\], got 'wgan'"),
        (dict(optimizer=dict(_target_="torch.optim.AdamWW")), r"model.optimizer._target_='torch.optim.AdamWW' cannot be built"),
        (dict(discriminator=dict(_target_="varlib.Discriminator")), r"model.discriminator._target_='varlib.Discriminator'"),
        (dict(optim=dict(lr=0.0)), r"optim.lr must be > 0"),
        (dict(optim=dict(decay_by_time="yes")), r"optim.decay_by_time must be true or false, got 'yes'"),
        (dict(ema_decay=1.5), r"ema_decay must be null or in \(0, 1\), got 1.5"),
        (dict(dead_code_restart_every=0), r"dead_code_restart_every must be null or an int >= 1"),
        (dict(vae={**TINY_VAE, "width": 3}), r"bad model.vae config"),
        (dict(loss=dict(lpips_weight=0.0, disc_weight=0.5), discriminator=dict(n_layers=4)), r"too small .* expected >= 48 px"),
    ],
)
def test_bad_config_values_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tmp_path, **kwargs)


def test_image_size_mismatch_fails_before_training(tmp_path):
    module = make_module(tmp_path)
    before = clone_params(module.vae)
    with pytest.raises(ValueError, match=r"data.image_size=48 does not match the tokenizer: expected 32 = last patch number 8 x downsample 4"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=RandomImages(image_size=48))
    assert not changed(before, module.vae)


def test_config_dataclasses_accept_the_defaults():
    assert TokenizerLossConfig().disc_loss == "hinge"
    assert OptimConfig(weight_decay=0.1).weight_decay == 0.1 and OptimConfig().disc_lr is None


# ------------------------------------------------------------------------------------------------ swappable parts


def test_swapped_optimizer_and_discriminator_train_checkpoint_as_plain_data_and_resume(tmp_path):
    from helpers.discriminators import GlobalDiscriminator

    optimizer = OmegaConf.create(dict(_target_="torch.optim.Adam", betas=[0.8, 0.9]))  # as Hydra passes it
    discriminator = dict(_target_="helpers.discriminators.GlobalDiscriminator", width=4)
    module = make_module(tmp_path, loss=dict(lpips_weight=0.0, disc_weight=0.5, disc_start_step=0),
                         optimizer=optimizer, discriminator=discriminator)
    assert isinstance(module.discriminator, GlobalDiscriminator) and module.discriminator.conv.out_channels == 4
    disc_before = clone_params(module.discriminator)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=RandomImages())
    assert [type(o) for o in trainer.optimizers] == [torch.optim.Adam, torch.optim.Adam]
    assert trainer.optimizers[0].param_groups[0]["betas"] == (0.8, 0.9)
    # the swapped one is trained (its head bias gets no hinge gradient: real and fake terms cancel)
    assert {"conv.weight", "head.weight"} <= changed(disc_before, module.discriminator)

    path = tmp_path / "swapped.ckpt"
    trainer.save_checkpoint(path)
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["optimizer"] == {"_target_": "torch.optim.Adam", "betas": [0.8, 0.9]}
    assert hparams["discriminator"] == discriminator
    resumed = TokenizerModule.load_from_checkpoint(path, weights_only=True)
    _assert_same_weights(resumed.discriminator, module.discriminator)
    again = make_trainer(tmp_path, max_steps=4)
    again.fit(resumed, datamodule=RandomImages(), ckpt_path=path)
    assert again.global_step == 4 and [type(o) for o in again.optimizers] == [torch.optim.Adam, torch.optim.Adam]
    assert len(again.optimizers[1].state) > 0


def test_optimizer_arguments_that_do_not_fit_name_the_config_node(tmp_path):
    module = make_module(tmp_path, optimizer=dict(betas=[0.5, 1.2]))
    with pytest.raises(ValueError, match=r"bad model.optimizer config for torch.optim.adamw.AdamW .*Invalid beta"):
        module.configure_optimizers()
    module = make_module(tmp_path, optimizer=dict(_target_="torch.optim.SGD", betas=[0.5, 0.9]))
    with pytest.raises(ValueError, match=r"bad model.optimizer config for torch.optim.sgd.SGD .*'betas'"):
        module.configure_optimizers()
