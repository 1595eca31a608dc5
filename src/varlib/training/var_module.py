"""VARModule: trains the VAR transformer on a frozen tokenizer with the official recipe (Lightning, thin).

Batches are either images ``(img (B,3,H,W) in [-1,1], labels (B,))``, tokenised on the fly by the frozen
tokenizer in fp32, or pre-tokenised ``(tokens (B,L) int64, labels (B,))`` from the token cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from varlib.evaluation.per_scale import PerScaleAccumulator
from varlib.images import image_grid
from varlib.io import model_metadata, save_var
from varlib.models.losses import token_cross_entropy
from varlib.models.schedules import scale_slices
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.models.sampling import SamplingConfig
from varlib.official import OFFICIAL_SAMPLING, load_official_vqvae
from varlib.training.ema import ModelEMA
from varlib.training.schedules import (
    cosine_weight_decay,
    decay_parameter_groups,
    lin0_lr_factor,
    progressive_num_scales,
)


def load_tokenizer(path: str) -> MultiScaleVQVAE:
    """A frozen tokenizer from a varlib file/checkpoint or an official ``vae_ch160v4096z32.pth``."""
    import varlib

    try:
        vae = varlib.load(path)
    except ValueError:
        vae = load_official_vqvae(path)
    if not isinstance(vae, MultiScaleVQVAE):
        raise ValueError(f"{path} holds a {type(vae).__name__}, expected a tokenizer (MultiScaleVQVAE)")
    return vae.eval().requires_grad_(False)


class VARModule(L.LightningModule):
    """Next-scale prediction with teacher forcing and uniform per-token cross-entropy.

    Args:
        tokenizer_path: the frozen tokenizer (varlib file or official checkpoint); or pass ``vae``.
        var: ``VAR`` keyword arguments (depth, num_classes, cond_drop_rate, ...).
        base_lr: lr per 256 images of global batch (official 1e-4); the peak lr is base_lr * global_batch / 256.
        betas, weight_decay, weight_decay_end: AdamW (official (0.9, 0.95), 0.05, constant).
        warmup_fraction, warmup_start, end_factor, flat_fraction: the 'lin0' schedule (official warm-up is
            1/50 of training, end_factor 0.01; the README trains d16/d20 with 0.1).
        grad_clip: max global gradient norm (official 2.0; 0 disables), also on sharded (FSDP2) parameters.
        label_smoothing: cross-entropy label smoothing (official 0).
        progressive_fraction, progressive_first: progressive training grows the trained scales from
            ``progressive_first`` to all by ``progressive_fraction`` of training (0 = off, official default).
        ema_decay: keep an EMA of the transformer used for validation, sampling and export (None = off). Under
            FSDP2 its tensors are sharded like the parameters (DTensors) and gathered on export.
        activation_checkpointing: recompute each block's activations in the backward pass (less memory,
            about one more forward of compute); per block, so it composes with DDP and FSDP2's per-block sharding.
        grid_classes, grid_per_class: after each validation, a grid of ``grid_per_class`` samples (rows) of
            classes 0..grid_classes-1 (columns), drawn with ``sampling`` and a fixed seed, goes to TensorBoard
            (``val/samples``); 0 classes, or no TensorBoard logger, skips it.
        sampling: the recommended ``generate`` settings (cfg, top_k, top_p) that validation samples use and
            the exported model file carries (default: the official FID settings 1.5, 900, 0.96).
        seed: the random draws of training step s (label dropout, drop-path) are seeded with
            seed + s * world_size + rank, so a run resumed from a checkpoint replays them exactly.
    """

    def __init__(
        self,
        var: Mapping[str, Any],
        tokenizer_path: str | None = None,
        vae: MultiScaleVQVAE | None = None,
        base_lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        weight_decay_end: float | None = None,
        warmup_fraction: float = 0.02,
        warmup_start: float = 0.005,
        end_factor: float = 0.01,
        flat_fraction: float = 0.05,
        grad_clip: float = 2.0,
        label_smoothing: float = 0.0,
        progressive_fraction: float = 0.0,
        progressive_first: int = 4,
        ema_decay: float | None = None,
        activation_checkpointing: bool = False,
        sampling: Mapping[str, float] | None = None,
        grid_classes: int = 8,
        grid_per_class: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if (tokenizer_path is None) == (vae is None):
            raise ValueError("give exactly one of tokenizer_path or vae")
        if grid_classes < 0 or grid_per_class < 1:
            raise ValueError(f"expected grid_classes >= 0 and grid_per_class >= 1, got {grid_classes}, {grid_per_class}")
        if base_lr <= 0 or not 0 <= label_smoothing < 1 or not 0 <= warmup_fraction < 1:
            raise ValueError(
                f"expected base_lr > 0, label_smoothing in [0, 1), warmup_fraction in [0, 1); "
                f"got {base_lr}, {label_smoothing}, {warmup_fraction}"
            )
        self.save_hyperparameters(ignore=["vae"])
        self.vae = load_tokenizer(tokenizer_path) if vae is None else vae.eval().requires_grad_(False)
        self.var = VAR(self.vae, **dict(var), activation_checkpointing=activation_checkpointing)
        self.var.sampling = OFFICIAL_SAMPLING if sampling is None else SamplingConfig.from_dict(sampling)
        self.slices = scale_slices(self.var.patch_nums)
        self.ema = ModelEMA(self.var, ema_decay) if ema_decay else None
        self.val_metrics: PerScaleAccumulator | None = None

    def setup(self, stage: str) -> None:
        """Checks the data against the model before any step, so a mismatch fails with a clear message."""
        data = self.trainer.datamodule if self.trainer is not None else None
        if data is None:
            return
        expected = {
            "patch_nums": tuple(self.var.patch_nums),
            "vocab_size": self.vae.vocab_size,
            "image_size": self.var.patch_nums[-1] * self.vae.downsample,
        }
        for name, want in expected.items():
            got = getattr(data, name, None)
            if got is not None and (tuple(got) if isinstance(got, (list, tuple)) else got) != want:
                raise ValueError(
                    f"data {name} {got} does not match the model's {want} (schedule {self.var.patch_nums} on a "
                    f"tokenizer with V={self.vae.vocab_size} and downsample {self.vae.downsample}); the last patch "
                    f"number must equal the latent side"
                )
        num_classes = getattr(data, "num_classes", None)
        if num_classes is not None and num_classes > self.var.num_classes:
            raise ValueError(f"data has {num_classes} classes but the model only {self.var.num_classes}")

    # -- data -> (tokens, teacher-forcing input) ------------------------------------------------------

    @torch.no_grad()
    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels (B,), targets (B,L), teacher-forcing input (B,L-1,Cvae)), computed in fp32."""
        x, labels = batch
        with torch.autocast(device_type=self.device.type, enabled=False):
            if x.dtype == torch.long:
                if x.ndim != 2 or x.shape[1] != self.var.L:
                    raise ValueError(f"token batches must be (B, L={self.var.L}), got {tuple(x.shape)}")
                tokens = [x[:, sl] for sl in self.slices]
            else:
                tokens = self.vae.encode_tokens(x.float(), self.var.patch_nums)
            x_BLCv = self.vae.teacher_forcing_input(tokens, self.var.patch_nums)
        return labels.long(), torch.cat(tokens, dim=1), x_BLCv

    def active_length(self) -> int:
        """Tokens trained at the current step (all of them unless progressive training is on)."""
        if self.hparams.progressive_fraction <= 0:
            return self.var.L
        total = self.trainer.estimated_stepping_batches
        start = int(self.hparams.warmup_fraction * total)
        n = progressive_num_scales(self.global_step, start, int(self.hparams.progressive_fraction * total),
                                   self.hparams.progressive_first, len(self.slices))
        return self.slices[n - 1].stop

    # -- steps -----------------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx):
        step_seed = self.hparams.seed + self.global_step * self.trainer.world_size + self.global_rank
        torch.manual_seed(step_seed)

    def training_step(self, batch, batch_idx):
        if batch is None:  # every sample of the batch was unreadable
            return None
        labels, targets_BL, x_BLCv = self.tokens_and_input(batch)
        length = self.active_length()
        logits = self.var(labels, x_BLCv[:, : length - 1])
        ce_BL = token_cross_entropy(logits, targets_BL[:, :length], self.hparams.label_smoothing)
        loss = ce_BL.mean()  # uniform weight per token, as the official recipe
        metrics = PerScaleAccumulator(self.var.patch_nums)
        metrics.update(logits.detach(), targets_BL[:, :length],
                       None if self.hparams.label_smoothing else ce_BL)
        stats = metrics.compute() if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0 else {}
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.hparams.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.var.parameters(), self.hparams.grad_clip)
            self.log("train/grad_norm", grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        total = self.trainer.estimated_stepping_batches
        wd_end = self.hparams.weight_decay if self.hparams.weight_decay_end is None else self.hparams.weight_decay_end
        for group in optimizer.param_groups:
            if group["base_weight_decay"] > 0:
                group["weight_decay"] = cosine_weight_decay(self.global_step, total, self.hparams.weight_decay, wd_end)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update(self.var)

    def on_validation_epoch_start(self):
        self.val_metrics = PerScaleAccumulator(self.var.patch_nums)

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        labels, targets_BL, x_BLCv = self.tokens_and_input(batch)
        with self.ema_weights():
            logits = self.var(labels, x_BLCv)
        self.val_metrics.update(logits, targets_BL)

    def on_validation_epoch_end(self):
        self._log_sample_grid()
        sums = self.val_metrics.sums.to(self.device)
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums).sum(0)
        self.val_metrics.sums = sums
        if sums[2].sum() == 0:
            return
        # already summed over ranks, so every rank logs the same global values
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, sync_dist=True)

    def _log_sample_grid(self) -> None:
        """Class-conditional samples to TensorBoard. Every rank samples (a sharded model's forward is
        collective), rank 0 logs; a fixed seed makes grids of successive validations comparable."""
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        classes = min(self.hparams.grid_classes, self.var.num_classes)
        if not writers or classes == 0 or self.trainer.sanity_checking:
            return
        labels_B = torch.arange(classes, device=self.device).repeat(self.hparams.grid_per_class)
        with self.image_generator() as generate:
            images_BCHW = generate(labels_B, self.hparams.seed)
        if self.global_rank == 0:
            grid = image_grid(images_BCHW.float().cpu(), columns=classes)
            for writer in writers:
                writer.add_image("val/samples", grid, self.global_step)

    # -- optimisation ----------------------------------------------------------------------------

    def global_batch_size(self) -> int:
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if batch is None:
            raise ValueError("cannot infer the batch size for the lr scaling; give the DataModule a batch_size")
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        peak_lr = self.hparams.base_lr * self.global_batch_size() / 256
        groups = decay_parameter_groups(self.var, self.hparams.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(self.hparams.betas),
                                      fused=self.device.type == "cuda")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = round(self.hparams.warmup_fraction * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lin0_lr_factor(
            step, warmup, total, self.hparams.warmup_start, self.hparams.end_factor, self.hparams.flat_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_model(self):
        """FSDP2 under ``ModelParallelStrategy``: shard every block, then the root, and the EMA like them.

        With bf16 precision on CUDA the gathered weights are cast to bf16 and gradients reduced in fp32; the
        sharded master weights, the optimiser state and the EMA stay fp32.
        """
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"] if "data_parallel" in self.device_mesh.mesh_dim_names else self.device_mesh
        bf16 = str(self.trainer.precision).startswith("bf16") and self.device.type == "cuda"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in self.var.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self.var, mesh=mesh, mp_policy=policy)
        if self.ema is not None:  # rebuilt from the (still initial) sharded parameters: its tensors are DTensors
            self.ema = ModelEMA(self.var, self.ema.decay)
        self._sharded = True

    # -- whole weights: sampling, export and checkpoints ------------------------------------------------

    def ema_weights(self):
        """Context in which the transformer holds the EMA weights (nothing changes without EMA)."""
        if self.ema is None:
            return nullcontext()
        if getattr(self, "_sharded", False):
            self.var.reshard()  # FSDP2 keeps the root gathered after a forward without backward (validation)
        return self.ema.swap(self.var)

    @contextmanager
    def full_weights(self) -> Iterator[VAR]:
        """The transformer with whole weights (the EMA's when enabled), in eval mode.

        Unsharded, this is ``self.var`` itself; under FSDP2 it is a plain copy holding the gathered weights, so
        that any submodule can be called alone (sampling does). Collective when sharded: enter it on every rank.
        """
        with self.ema_weights():
            if not getattr(self, "_sharded", False):
                was_training = self.var.training
                try:
                    yield self.var.eval()
                finally:
                    self.var.train(was_training)
                return
            self.var.reshard()
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.var.state_dict().items()}
        plain = VAR(self.vae, **dict(self.hparams.var)).to(self.device)
        plain.load_state_dict(state)
        plain.sampling = self.var.sampling
        yield plain.eval()

    @contextmanager
    def image_generator(self) -> Iterator[Callable[[torch.Tensor, int], torch.Tensor]]:
        """Context giving ``generate(labels_B, seed) -> (B,3,H,W) images in [0,1]`` on the (EMA) weights with the
        model's sampling settings (the hook that the FID/IS callback and the validation grid use). Collective on
        entry under FSDP2; ``generate`` calls are local."""
        with self.full_weights() as var:
            yield lambda labels_B, seed: var.generate(labels_B, seed=seed)

    def export(self, path: str | os.PathLike) -> Path:
        """Writes the transformer (EMA weights when enabled) with its tokenizer for ``varlib.load``.

        Call it on every rank: sharded (FSDP2) weights are gathered collectively, rank 0 writes the file.
        """
        with self.full_weights() as var:
            if self.global_rank == 0:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                save_var(var, path)
        return Path(path)

    def _ema_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"ema.params.{k}": v for k, v in self.ema.shadow_params.items()},
                **{f"ema.buffers.{k}": v for k, v in self.ema.shadow_buffers.items()}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The EMA tensors join the model's state dict (so a distributed checkpoint stores each rank's shard);
        its counters go in the metadata."""
        checkpoint["varlib"] = model_metadata(self.vae, self.var)
        if self.ema is not None:
            checkpoint["state_dict"].update(self._ema_tensors())
            checkpoint["ema"] = {k: v for k, v in self.ema.state_dict().items() if k not in ("params", "buffers")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state_dict = checkpoint.get("state_dict")
        ema_keys = [k for k in (state_dict or {}) if k.startswith("ema.")]
        ema_tensors = {k: state_dict.pop(k) for k in ema_keys}  # never reaches the strict model load
        if self.ema is None or "ema" not in checkpoint:
            return
        if state_dict is None:  # distributed checkpoint: the strategy loaded the model; read the EMA shards in place
            ema_tensors = self._ema_tensors()
            dcp.load({"state_dict": ema_tensors}, checkpoint_id=self.trainer.ckpt_path)
        self.ema.load_state_dict({
            **checkpoint["ema"],
            "params": {k.removeprefix("ema.params."): v for k, v in ema_tensors.items() if k.startswith("ema.params.")},
            "buffers": {k.removeprefix("ema.buffers."): v for k, v in ema_tensors.items() if k.startswith("ema.buffers.")},
        })
