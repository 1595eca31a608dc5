"""VARModule: the official no-decay groups, training from images or a token cache, resumable training."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.per_scale import per_scale_metrics
from helpers.token_caches import tokenize_to_cache

import varlib
from varlib.data.token_cache import TokenCacheDataModule
from varlib.models.sampling import SamplingConfig
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.optim_schedules import decay_parameter_groups
from varlib.training.var_module import VARModule

PATCH_NUMS = (1, 2, 3, 4)
TINY_VAR = dict(depth=2, num_classes=3, width=64, num_heads=2)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=PATCH_NUMS).eval()


class ImageData(L.LightningDataModule):
    def __init__(self, n=16, batch_size=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size)


def test_no_decay_groups_follow_the_official_set():
    var = varlib.VAR(tiny_vae(), varlib.VARConfig(**TINY_VAR))
    decay, no_decay = decay_parameter_groups(var, 0.05)
    names = {id(p): n for n, p in var.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"class_emb.weight", "word_embed.weight", "head.weight", "blocks.1.attn.mat_qkv.weight"} <= decay_names
    assert not decay_names & no_decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(var.parameters()))


def fit(module, data, tmp_path, steps, **trainer_kwargs):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


def test_per_scale_training_metrics_only_on_logged_steps(tmp_path, monkeypatch):
    """The per-scale accumulator (an argmax over (B,L,V)) runs on the steps that log it, every
    log_every_n_steps, not on every step."""
    from varlib.training import token_transformer_module

    steps_updated = []

    class CountingAccumulator(token_transformer_module.PerScaleAccumulator):
        def update(self, logits_BLV, targets_BL, ce_BL=None):
            steps_updated.append(module.global_step)
            super().update(logits_BLV, targets_BL, ce_BL)

    monkeypatch.setattr(token_transformer_module, "PerScaleAccumulator", CountingAccumulator)
    module = VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(lr=1e-2))
    trainer = L.Trainer(max_steps=7, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=3,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ImageData(n=8, batch_size=2))
    assert steps_updated == [0, 3, 6]
    assert "train/err_avg" in trainer.callback_metrics


def test_training_from_images_reduces_loss_and_logs_paper_metrics(tmp_path):
    L.seed_everything(0)
    module = VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(lr=6.25e-3, warmup_fraction=0.1), ema_decay=0.9)
    data = ImageData(n=8, batch_size=8)
    labels, targets, x = module.tokens_and_input(next(iter(data.val_dataloader())))
    with torch.no_grad():
        before = per_scale_metrics(module.var.eval()(labels, x), targets, PATCH_NUMS)["loss_avg"]
    trainer = fit(module, data, tmp_path, steps=30, limit_val_batches=1, check_val_every_n_epoch=30)
    logged = trainer.callback_metrics
    for key in ("val/loss_avg", "val/loss_last", "val/err_avg", "val/err_last", "val/loss_s0", "val/loss_s3",
                "train/loss_avg", "train/err_last"):
        assert key in logged, key
    assert logged["val/loss_avg"] < before - 0.3
    peak = 6.25e-3
    assert trainer.optimizers[0].param_groups[0]["lr"] < peak and trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    module.export(tmp_path / "var.safetensors")
    loaded = varlib.load(tmp_path / "var.safetensors")
    with module.ema.swap(module.var):
        assert torch.equal(loaded.head.weight, module.var.head.weight)
    # One EMA convention: the checkpoint holds the online weights, varlib.load of it gives what export wrote.
    trainer.save_checkpoint(tmp_path / "var.ckpt")
    checkpoint = torch.load(tmp_path / "var.ckpt", weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["var.head.weight"], module.var.head.weight)
    assert not torch.equal(loaded.head.weight, module.var.head.weight)
    from_checkpoint = varlib.load(tmp_path / "var.ckpt")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[name], tensor), name
    assert torch.equal(varlib.load(tmp_path / "var.ckpt", ema=False).head.weight, module.var.head.weight)


def test_token_cache_round_trip_and_training(tmp_path):
    vae = tiny_vae()
    data = ImageData(n=12, batch_size=4)
    n = tokenize_to_cache(vae, data.train_dataloader(), tmp_path / "cache", "train", num_classes=3, with_flip=True)
    tokenize_to_cache(vae, data.val_dataloader(), tmp_path / "cache", "val", num_classes=3)
    assert n == 12
    cache = TokenCacheDataModule(str(tmp_path / "cache"), batch_size=4, use_flip=True)
    cache.setup()
    assert cache.patch_nums == PATCH_NUMS and len(cache.train_set) == 12 and len(cache.val_set) == 12
    tokens, label = cache.val_set[5]
    want = torch.cat(vae.encode_tokens(data.images[5:6]), dim=1)[0]
    assert torch.equal(tokens, want) and label == data.labels[5]
    flip_want = torch.cat(vae.encode_tokens(data.images[5:6].flip(-1)), dim=1)[0]
    assert any(torch.equal(cache.train_set.row(i, flipped=True).long(), flip_want) for i in range(12))
    module = VARModule(var=TINY_VAR, vae=vae, optim=dict(lr=3.125e-3, warmup_fraction=0))
    from_tokens = module.tokens_and_input((tokens[None], label[None]))
    from_image = module.tokens_and_input((data.images[5:6], data.labels[5:6]))
    for a, b in zip(from_tokens, from_image):
        assert torch.equal(a, b)
    untrained = copy.deepcopy(module)
    trainer = fit(module, cache, tmp_path, steps=9, limit_val_batches=3)
    before = trainer.validate(untrained, datamodule=cache, verbose=False)[0]["val/loss_avg"]
    after = trainer.validate(module, datamodule=cache, verbose=False)[0]["val/loss_avg"]
    assert after < before - 0.3, (before, after)  # the val split holds the 12 training images, unflipped


def test_module_passes_runtime_options_to_the_transformer():
    module = VARModule(var=TINY_VAR, vae=tiny_vae(), attn_impl="dense", activation_checkpointing=True)
    assert module.var.activation_checkpointing and module.var.attn_impl == "dense"
    assert "attn_impl" not in module.var.config  # runtime settings are not saved with the weights
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), attn_impl="sparse")


def test_bad_configuration_fails_early(tmp_path):
    with pytest.raises(ValueError, match="depth must be >= 1"):
        VARModule(var={**TINY_VAR, "depth": 0}, vae=tiny_vae())
    with pytest.raises(ValueError, match=r"unknown model.var keys \['attn_impl'\]"):  # a module setting
        VARModule(var={**TINY_VAR, "attn_impl": "dense"}, vae=tiny_vae())
    with pytest.raises(ValueError, match="exactly one of tokenizer_path or vae"):
        VARModule(var=TINY_VAR)
    with pytest.raises(ValueError, match="lr > 0"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(lr=0))
    with pytest.raises(ValueError, match=r"unknown model.optim keys \['base_lr'\]; expected some of \['lr'"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(base_lr=1e-4))
    with pytest.raises(ValueError, match=r"optim.grad_clip must be > 0, got 0"):  # off is null, as for the tokenizer
        VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(grad_clip=0))
    with pytest.raises(ValueError, match=r"loss.label_smoothing in \[0, 1\), got 1.0"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), loss=dict(label_smoothing=1.0))
    with pytest.raises(FileNotFoundError):
        VARModule(var=TINY_VAR, tokenizer_path=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match=r"model.optimizer._target_='torch.optim.Adamw' cannot be built: expected an "
                                         r"importable class or function such as torch.optim.AdamW"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), optimizer=dict(_target_="torch.optim.Adamw"))
    with pytest.raises(ValueError, match=r"model.optimizer must be a config node with a _target_, got 'adam'"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), optimizer="adam")


def test_validation_logs_a_class_conditional_sample_grid_and_exports_the_sampling_settings(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = VARModule(var=TINY_VAR, vae=tiny_vae(), grid_classes=5, grid_per_class=2,
                       sampling={"cfg": 2.0, "top_k": 4, "top_p": 0.9})
    assert module.var.sampling == SamplingConfig(cfg=2.0, top_k=4, top_p=0.9)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=1, logger=TensorBoardLogger(tmp_path, name="tb", version=""))
    trainer.fit(module, datamodule=ImageData(n=4, batch_size=2))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("val/samples")
    assert [g.step for g in grids] == [1, 2]  # one per validation, none in the sanity check
    # the 3 classes of the model (fewer than grid_classes) in columns, 2 rows; 64 px images, 2 px padding
    assert (grids[-1].width, grids[-1].height) == (3 * 66 + 2, 2 * 66 + 2)
    with module.image_generator() as generate:
        generated = generate(torch.arange(3), 0)
    assert torch.equal(generated, module.var.generate(torch.arange(3), seed=0, cfg=2.0, top_k=4, top_p=0.9))

    module.export(tmp_path / "var.safetensors")
    assert varlib.load(tmp_path / "var.safetensors").sampling == module.var.sampling
    with pytest.raises(ValueError, match="grid_classes >= 0"):
        VARModule(var=TINY_VAR, vae=tiny_vae(), grid_classes=-1)


def test_a_swapped_optimizer_gets_the_recipes_groups_and_lr_and_checkpoints_as_plain_data(tmp_path):
    module = VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(lr=0.1, weight_decay=0.07, warmup_fraction=0),
                       optimizer=dict(_target_="torch.optim.Adam", betas=[0.8, 0.9]))
    trainer = fit(module, ImageData(n=8, batch_size=4), tmp_path, steps=2, limit_val_batches=0)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["betas"] == (0.8, 0.9)
    assert sorted(group["base_weight_decay"] for group in optimizer.param_groups) == [0.0, 0.07]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1)
    trainer.save_checkpoint(tmp_path / "adam.ckpt")
    hparams = torch.load(tmp_path / "adam.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["optimizer"] == {"_target_": "torch.optim.Adam", "betas": [0.8, 0.9]}


class TokenData(L.LightningDataModule):
    """Random token rows (B, L) of the tiny schedule with labels, as a token cache gives them."""

    def __init__(self, n=8, batch_size=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 32, (n, sum(pn * pn for pn in PATCH_NUMS)), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens, self.labels), batch_size=self.batch_size, shuffle=True)


class RecordSteps(L.Callback):
    """Per training step: the transformer's input, its logits, the batch and the loss the step returned."""

    def __init__(self):
        self.calls, self.steps = [], []

    def on_fit_start(self, trainer, pl_module):
        pl_module.var.register_forward_hook(lambda module, args, logits: self.calls.append((args[1], logits.detach())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x_BlCv, logits = self.calls.pop()
        self.steps.append((batch[0], x_BlCv, logits, outputs["loss"].detach()))


def test_progressive_training_trains_the_growing_prefix_of_scales(tmp_path):
    """8 steps, warm-up 0.2 (1 step), progressive 0.5 (until step 4) from 1 scale: scales 1, 1, 2, 3, 4, 4, 4, 4,
    i.e. 1, 1, 5, 14, 30, ... tokens (schedule 1,2,3,4); each step's loss is the cross-entropy over that prefix."""
    module = VARModule(var=TINY_VAR, vae=tiny_vae(), optim=dict(lr=1.5625e-3, warmup_fraction=0.2),
                       loss=dict(progressive_fraction=0.5, progressive_first=1))
    recorder = RecordSteps()
    fit(module, TokenData(), tmp_path, steps=8, limit_val_batches=0, callbacks=[recorder])
    assert [logits.shape[1] for _, _, logits, _ in recorder.steps] == [1, 1, 5, 14, 30, 30, 30, 30]
    for step, (tokens_BL, x_BlCv, logits, loss) in enumerate(recorder.steps):
        length = logits.shape[1]
        full_input = module.vae.teacher_forcing_input([tokens_BL[:, sl] for sl in module.slices], PATCH_NUMS)
        assert torch.equal(x_BlCv, full_input[:, : length - 1]), step
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens_BL[:, :length].flatten())
        assert loss.item() == pytest.approx(want.item(), rel=1e-6), step
