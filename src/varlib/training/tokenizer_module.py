"""LightningModule that trains VAR's multi-scale VQ tokenizer: L2/L1 + VQ + LPIPS + PatchGAN (paper eq. 5).

Manual optimisation with two optimisers (AdamW unless ``model.optimizer`` swaps it): the autoencoder (encoder, decoder, codebook, phi) and the
discriminator, which only steps from ``loss.disc_start_step`` on. ``trainer.max_steps`` and every ``*_step``
setting count Lightning's ``global_step``, which grows by one per optimiser step: one per batch before the
discriminator starts, two per batch after.

Checkpoints hold the autoencoder under ``vae.`` and ``checkpoint["varlib"]``, so ``varlib.load(ckpt)`` opens them.
With EMA on, ``vae.`` holds the online weights and the EMA's (what validation, ``export`` and ``varlib.load`` use)
sit beside them as in every varlib checkpoint (see :mod:`varlib.training.ema`). The fixed networks (LPIPS, the rFID
extractor) are rebuilt from the config rather than saved; the quantizer's non-persistent update count goes under
``checkpoint["vae_unsaved_buffers"]``. Only plain containers are saved, so checkpoints load with
``torch.load(weights_only=True)``.

A run resumed from a checkpoint replays the uninterrupted one: each step's random draws are seeded by the step
(``seed``) and the learning rate and GAN schedule are functions of ``global_step``. With ``optim.decay_by_time`` and
``trainer.max_time`` the decay follows the clock of Lightning's Timer instead, which the checkpoint keeps: the
resumed run continues from the time elapsed at the save (the time between the save and the kill is not counted),
so it resumes close to, not exactly like, an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from omegaconf import Container, OmegaConf
from torch import nn

from varlib.data.base import images_from_batch
from varlib.evaluation.codebook_usage import CodebookUsage
from varlib.evaluation.generative_metrics import GenerativeMetrics
from varlib.evaluation.image_quality import ReconstructionMetrics
from varlib.images import image_grid, signed_float_to_uint8
from varlib.files.loading import pop_ema_tensors
from varlib.loggers import log_image
from varlib.files.format import model_metadata, save_tokenizer
from varlib.models.quantizer import QuantizerOutput
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.components import build_component, component_factory, construct
from varlib.training.ema import ModelEMA
from varlib.training.finetune import start_tokenizer
from varlib.training.gan import gan_start_factor
from varlib.training.optim_schedules import lr_multiplier
from varlib.training.perceptual import PerceptualLoss, default_vgg16_weights_path
from varlib.training.seeding import seed_training_step
from varlib.training.settings import OptimConfig, TokenizerLossConfig, build_config
from varlib.training.tokenizer_loss import autoencoder_loss, discriminator_loss

# Fixed networks: rebuilt from the config, left out of checkpoints (the VGG trunk alone is ~60 MB).
FIXED_NETWORK_PREFIXES = ("perceptual.", "rfid_metric.")
#: ``model.optimizer`` and ``model.discriminator`` when none is given (VQGAN's betas, the PatchGAN)
TOKENIZER_OPTIMIZER = {"_target_": "torch.optim.AdamW", "betas": [0.5, 0.9]}
DISCRIMINATOR = "varlib.training.discriminator.PatchDiscriminator"


def unsaved_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that its state dict leaves out (non-persistent, so that official checkpoints load
    strictly) but training needs, such as the quantizer's update count: checkpoints keep them beside it."""
    saved = module.state_dict().keys()
    return {name: buffer for name, buffer in module.named_buffers() if name not in saved}


def check_training_options(ema_decay: float | None, dead_code_restart_every: int | None, dead_code_min_hits: float,
                           num_grid_images: int) -> None:
    """Raises ValueError for a tokenizer module's EMA, dead-code and grid options outside their range."""
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be null or in (0, 1), got {ema_decay!r}")
    if dead_code_restart_every is not None and (
        isinstance(dead_code_restart_every, bool) or not isinstance(dead_code_restart_every, int)
        or dead_code_restart_every < 1
    ):
        raise ValueError(f"dead_code_restart_every must be null or an int >= 1, got {dead_code_restart_every!r}")
    if dead_code_min_hits < 0:
        raise ValueError(f"dead_code_min_hits must be >= 0, got {dead_code_min_hits!r}")
    if num_grid_images < 0:
        raise ValueError(f"num_grid_images must be >= 0, got {num_grid_images!r}")


class TokenizerModule(L.LightningModule):
    """Trains a :class:`MultiScaleVQVAE` (held as ``self.vae``) with a PatchGAN and an LPIPS loss.

    Args:
        vae: MultiScaleVQVAE constructor kwargs (``model.vae``), or a built MultiScaleVQVAE.
        loss: :class:`TokenizerLossConfig` fields (loss weights, GAN start step).
        optim: :class:`OptimConfig` fields (lr, weight decay, warm-up, decay, gradient clipping).
        optimizer: the optimiser of both networks as a config node ``{_target_: torch.optim.AdamW, betas: [0.5,
            0.9], ...}`` (plain data; default :data:`TOKENIZER_OPTIMIZER`); the module calls its target with each
            network's parameters, ``lr`` and ``weight_decay`` from ``optim``.
        perceptual: PerceptualLoss kwargs (``vgg_weights_path``, ``allow_random_backbone``). LPIPS is built when
            ``loss.lpips_weight > 0`` or when the VGG weights exist (then validation also logs ``val/lpips``).
        discriminator: the discriminator as a config node (default ``_target_``: :class:`PatchDiscriminator
            <varlib.training.discriminator.PatchDiscriminator>`, kwargs ``base_channels``, ``n_layers``, ``norm``);
            its target is called with ``in_channels`` and must map images (B,C,H,W) to real/fake logits. Built
            when ``loss.disc_weight > 0``; a ``min_input_size`` attribute, when it has one, is checked against
            the image size.
        ema_decay: None (off) or the decay of an EMA of the autoencoder weights.
        ema_warmup: ramp the EMA decay up over the first updates (see ModelEMA).
        dead_code_restart_every: None (off) or N: every N steps, re-seed codes whose per-scale EMA hit count is
            below ``dead_code_min_hits`` at every scale with latent vectors of the current batch.
        num_grid_images: reconstructions logged after each validation, to every logger (0: none).
        rfid_extractor: optional config node of a FeatureExtractor (uint8 (B,3,H,W) -> (features, logits)), e.g.
            ``{_target_: varlib.evaluation.build_inception_extractor}``; validation then logs ``val/rfid``.
        channels_last: keep the autoencoder's and discriminator's conv weights channels-last (NHWC), which
            oneDNN and cuDNN run faster; the weights' values and exported files are the same.
        seed: the random draws of training step s (dropout, dead-code restarts) are seeded with
            seed + s * world_size + rank, so a run resumed from a checkpoint replays them exactly.
        init_from: fine-tuning: start from the weights (only) of any tokenizer file ``varlib.load`` opens (the
            official ``vae_ch160v4096z32.pth``, a varlib file or checkpoint; a transformer file gives its
            tokenizer); ``vae`` entries set to null take the pretrained tokenizer's values.
        trainable: fnmatch patterns of the autoencoder's trained parameters (``decoder.*``); the rest is frozen.

    Batches are ``(images (B,3,H,W) in [-1, 1], labels)`` or bare image tensors.
    """

    def __init__(
        self,
        vae: Mapping[str, Any] | MultiScaleVQVAE,
        loss: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        perceptual: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        dead_code_restart_every: int | None = None,
        dead_code_min_hits: float = 0.05,
        num_grid_images: int = 8,
        rfid_extractor: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        seed: int = 0,
        init_from: str | None = None,
        trainable: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loss_config = build_config(TokenizerLossConfig, loss, "model.loss")
        self.optim_config = build_config(OptimConfig, optim, "model.optim")
        self.optimizer_factory = component_factory(
            TOKENIZER_OPTIMIZER if optimizer is None else optimizer, "model.optimizer", "torch.optim.AdamW")
        check_training_options(ema_decay, dead_code_restart_every, dead_code_min_hits, num_grid_images)
        self.vae = start_tokenizer(vae, type(self).__name__, init_from, trainable)
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["vae"])
        self.hparams.update({k: OmegaConf.to_container(v, resolve=True) for k, v in self.hparams.items()
                             if isinstance(v, Container)})
        self.hparams["vae"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.vae.config.items()}
        self.perceptual = self._perceptual_loss(perceptual)
        self.discriminator = self._discriminator(discriminator)
        for network in (self.vae, self.discriminator) if channels_last else ():
            if network is not None:
                network.to(memory_format=torch.channels_last)
        self._build_metrics(rfid_extractor)
        self.ema = ModelEMA(self.vae, ema_decay, ema_warmup) if ema_decay is not None else None
        self._ema_scope = ExitStack()

    def _perceptual_loss(self, perceptual: Mapping[str, Any] | None) -> PerceptualLoss | None:
        """LPIPS (``model.perceptual``), when the loss weighs it or its VGG weights exist."""
        perceptual = dict(perceptual or {})
        vgg_path = perceptual.get("vgg_weights_path") or default_vgg16_weights_path()
        wants_lpips = self.loss_config.lpips_weight > 0 or Path(vgg_path).is_file()
        return construct(PerceptualLoss, perceptual, "model.perceptual") if wants_lpips else None

    def _discriminator(self, discriminator: Mapping[str, Any] | None) -> nn.Module | None:
        """The discriminator of ``model.discriminator`` when the GAN loss is on, checked against the image size."""
        factory = component_factory(discriminator, "model.discriminator", DISCRIMINATOR)
        if self.loss_config.disc_weight <= 0:
            return None
        network = build_component(factory, "model.discriminator", in_channels=self.vae.in_channels)
        min_size = getattr(network, "min_input_size", 0)
        if self.vae.image_size < min_size:
            raise ValueError(f"images of {self.vae.image_size} px are too small for the discriminator "
                             f"{factory.keywords}: expected >= {min_size} px")
        return network

    def _build_metrics(self, rfid_extractor: Mapping[str, Any] | None) -> None:
        """The validation metrics: reconstruction (with LPIPS on a pretrained backbone), codebook usage and rFID."""
        pretrained_lpips = self.perceptual is not None and self.perceptual.pretrained_backbone
        lpips_metric = partial(self.perceptual, reduction="none") if pretrained_lpips else None
        self.val_metrics = ReconstructionMetrics(perceptual=lpips_metric, prefix="val/")
        self.val_codebook_usage = CodebookUsage(self.vae.vocab_size)
        self.rfid_metric = None
        if rfid_extractor is not None:
            extractor_factory = component_factory(rfid_extractor, "model.rfid_extractor")
            self.rfid_metric = GenerativeMetrics(build_component(extractor_factory, "model.rfid_extractor"),
                                                 num_is_splits=1)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Fails before training on a strategy that shards parameters or data of the wrong image size."""
        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"TokenizerModule needs whole parameters on every process (EMA, code restarts, adaptive GAN "
                f"weight), got strategy {type(self.trainer.strategy).__name__}; use trainer=ddp"
            )
        if isinstance(self.trainer.strategy, DDPStrategy):
            ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", {})  # Lightning keeps DDP's options here
            if self.discriminator is not None and not ddp_kwargs.get("find_unused_parameters", False):
                raise ValueError(
                    "the tokenizer's autoencoder and discriminator steps each leave the other's parameters without "
                    "gradients: DDP needs trainer.strategy.find_unused_parameters=true, got false"
                )
            if not ddp_kwargs.get("broadcast_buffers", True):
                raise ValueError(
                    "the quantizer's code-usage statistics are buffers that every rank must share: DDP needs "
                    "trainer.strategy.broadcast_buffers=true, got false"
                )
        image_size = getattr(self.trainer.datamodule, "image_size", None)
        if image_size is not None and image_size != self.vae.image_size:
            raise ValueError(
                f"data.image_size={image_size} does not match the tokenizer: expected {self.vae.image_size} = last "
                f"patch number {self.vae.patch_nums[-1]} x downsample {self.vae.downsample} (model.vae.patch_nums, "
                f"model.vae.ch_mult)"
            )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.optim_config
        networks = [(self.vae, cfg.lr)]
        if self.discriminator is not None:
            networks.append((self.discriminator, cfg.lr if cfg.disc_lr is None else cfg.disc_lr))
        return [build_component(self.optimizer_factory, "model.optimizer",
                                [p for p in network.parameters() if p.requires_grad], lr=lr,
                                weight_decay=cfg.weight_decay) for network, lr in networks]

    # -- training ------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_training_step(self, self.hparams.seed)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        img = images_from_batch(batch)
        step = self.global_step
        optimizers = self.optimizers()
        opt_ae, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        self._set_learning_rates(step, opt_ae, opt_d)

        recon, quant = self.vae(img)
        gan_factor = gan_start_factor(step, self.loss_config.disc_start_step) if opt_d is not None else 0.0
        with self.toggled_optimizer(opt_ae):
            parts = autoencoder_loss(
                img, recon, quant.vq_loss, self.loss_config, self.perceptual, self.discriminator,
                self.vae.decoder.last_layer_weight, gan_factor,
            )
            self._optimizer_step(opt_ae, parts["total"])
        if self.ema is not None:
            self.ema.update(self.vae)
        if gan_factor > 0:
            with self.toggled_optimizer(opt_d):
                parts["disc"] = discriminator_loss(img, recon, self.discriminator, self.loss_config.disc_loss)
                self._optimizer_step(opt_d, parts["disc"])
        self._log_training(parts, quant)
        self._restart_dead_codes(img, step)

    def _optimizer_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim_config.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_config.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def _set_learning_rates(self, step: int, opt_ae: Any, opt_d: Any | None) -> None:
        cfg = self.optim_config
        total_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        timer = self._training_timer() if cfg.decay_by_time else None
        time_fraction = None
        if timer is not None:
            elapsed = timer.time_elapsed()
            # Rank 0's clock for every process: DDP replicas must step with one learning rate to stay equal.
            time_fraction = self.trainer.strategy.broadcast(elapsed / (elapsed + timer.time_remaining()), src=0)
        factor = lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.decay, cfg.min_lr_ratio, time_fraction)
        disc_lr = cfg.lr if cfg.disc_lr is None else cfg.disc_lr
        for optimizer, base_lr in ((opt_ae, cfg.lr), (opt_d, disc_lr)):
            for group in optimizer.param_groups if optimizer is not None else []:
                group["lr"] = base_lr * factor
        self.log("train/lr", cfg.lr * factor)

    def _training_timer(self) -> Timer | None:
        """The trainer's ``max_time`` timer, or None when the run has no time limit."""
        return next((c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)

    def _log_training(self, parts: dict[str, torch.Tensor], quant: QuantizerOutput) -> None:
        values = {f"train/{name}": value.detach() for name, value in parts.items() if name != "rec"}
        for k, (usage, perplexity) in enumerate(zip(quant.usage, quant.perplexity)):
            values[f"train/usage_s{k}"] = usage
            values[f"train/perplexity_s{k}"] = perplexity
        self.log_dict(values)
        self.log("train/rec", parts["rec"].detach(), prog_bar=True)
        self.log("train/codebook_usage", quant.usage[-1], prog_bar=True)

    def _restart_dead_codes(self, img_B3HW: torch.Tensor, step_before: int) -> None:
        """Every ``dead_code_restart_every`` steps; rank 0's codebook is then broadcast to keep replicas equal."""
        every = self.hparams.dead_code_restart_every
        if every is None or self.global_step // every == step_before // every:
            return
        with torch.no_grad():
            f_BChw = self.vae.encode(img_B3HW)
        restarted = self.vae.quantize.restart_dead_codes(f_BChw, self.hparams.dead_code_min_hits)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.vae.quantize.embedding.weight.data, src=0)
        self.log("train/dead_codes_restarted", float(restarted))

    # -- validation ----------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self._ema_scope.enter_context(self.ema.swap(self.vae))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        img = images_from_batch(batch)
        recon_unclamped, quant = self.vae(img)
        recon = recon_unclamped.clamp(-1, 1)
        self.val_metrics.update(recon, img)
        self.val_codebook_usage.update(quant.tokens[-1])
        self.log("val/rec_loss", F.mse_loss(recon_unclamped, img), sync_dist=True, batch_size=img.shape[0])
        if self.rfid_metric is not None:
            self.rfid_metric.update(signed_float_to_uint8(img), real=True)
            self.rfid_metric.update(signed_float_to_uint8(recon), real=False)
        if batch_idx == 0 and self.hparams.num_grid_images > 0:
            self._log_reconstruction_grid(img, recon)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics has already summed the states over processes; sync_dist only averages equal values.
        values = dict(self.val_metrics.compute())
        values["val/codebook_usage"] = self.val_codebook_usage.compute()
        self.val_metrics.reset()
        self.val_codebook_usage.reset()
        if self.rfid_metric is not None:
            values["val/rfid"] = torch.tensor(self.rfid_metric.compute()["fid"], device=self.device)
            self.rfid_metric.reset()
        self.log_dict(values, sync_dist=True)
        self._ema_scope.close()

    def _log_reconstruction_grid(self, img: torch.Tensor, recon: torch.Tensor) -> None:
        count = min(self.hparams.num_grid_images, img.shape[0])
        unit_NCHW = torch.cat([img[:count], recon[:count]]).detach().float().clamp(-1, 1).add(1).div(2)
        grid = image_grid(unit_NCHW, columns=count)  # originals above their reconstructions
        log_image(self.trainer, "val/reconstructions", grid, self.global_step)

    # -- checkpoints and export ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["varlib"] = model_metadata(self.vae)
        checkpoint["vae_unsaved_buffers"] = unsaved_buffers(self.vae)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FIXED_NETWORK_PREFIXES)]:
            del state[key]
        if self.ema is not None:  # online weights in the state dict, the EMA's beside them (varlib.training.ema)
            state.update(self.ema.checkpoint_tensors())
            checkpoint["ema"] = self.ema.checkpoint_counters()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in checkpoint.get("vae_unsaved_buffers", {}).items():
                self.vae.get_buffer(name).copy_(value)
        state = checkpoint["state_dict"]
        state.update({k: v for k, v in self.state_dict().items() if k.startswith(FIXED_NETWORK_PREFIXES)})
        ema_tensors = pop_ema_tensors(state)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_checkpoint(checkpoint["ema"], ema_tensors)

    def export(self, path: str | os.PathLike) -> Path:
        """Writes the autoencoder (EMA weights when EMA is on) as a ``.safetensors`` that ``varlib.load`` opens.

        Called on every rank; global rank 0 writes.
        """
        path = Path(path)
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self.ema.swap(self.vae) if self.ema is not None else nullcontext():
                save_tokenizer(self.vae, path)
        return path
