"""What VAR's and the raster-AR baseline's Lightning modules share: the official optimisation recipe (AdamW with
the no-decay groups, the 'lin0' lr schedule, global gradient clipping, the weight-decay schedule), step-seeded
randomness, the teacher-forced cross-entropy step with per-scale metrics, EMA, FSDP2 sharding, the validation sample
grid, whole-weight sampling/export and checkpoint metadata.

A subclass builds its transformer with :meth:`build_transformer` in ``__init__`` (after ``save_hyperparameters``,
whose hparams hold ``seed``, ``grid_classes`` and ``grid_per_class``), sets ``optim_config`` (a
:class:`RecipeOptimConfig`), ``optimizer_factory`` (:func:`recipe_optimizer_factory` of ``model.optimizer``) and
``loss_config`` (a :class:`TokenLossConfig`), names the transformer with
:attr:`transformer`, and implements :meth:`tokens_and_input`. The transformer is called as
``transformer(labels (B,), input[:, :length-1])`` and returns logits (B, length, V); it has ``patch_nums``, ``L``,
``blocks``, ``num_classes``, ``sampling``, ``config`` and ``generate(labels, seed=...)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from varlib.evaluation.per_scale import PerScaleAccumulator
from varlib.images import image_grid
from varlib.io import pop_ema_tensors
from varlib.models.hub import model_metadata, save_var
from varlib.models.losses import token_cross_entropy
from varlib.training.components import build_component, component_factory
from varlib.training.ema import ModelEMA
from varlib.training.optim_schedules import cosine_weight_decay, decay_parameter_groups, lin0_lr_factor
from varlib.training.seeding import seed_training_step


@dataclass(frozen=True)
class RecipeOptimConfig:
    """The official optimisation recipe (``model.optim``): what the module computes around the optimiser that
    ``model.optimizer`` builds.

    base_lr: lr per 256 images of global batch (official 1e-4); the peak lr is base_lr * global_batch / 256.
    weight_decay, weight_decay_end: the decay of the weight matrices' parameter group (official 0.05, constant;
        norms, biases and embeddings take none); weight_decay_end, when given, is reached by a cosine over
        training (official d30/d36: 0.08).
    warmup_fraction, warmup_start, end_factor, flat_fraction: the 'lin0' schedule (official warm-up is 1/50 of
        training, end_factor 0.01; the README trains d16/d20 with 0.1).
    grad_clip: max global gradient norm (official 2.0; 0 disables), also on sharded (FSDP2) parameters.
    """

    base_lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    warmup_fraction: float = 0.02
    warmup_start: float = 0.005
    end_factor: float = 0.01
    flat_fraction: float = 0.05
    grad_clip: float = 2.0

    def __post_init__(self) -> None:
        if self.base_lr <= 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"expected optim.base_lr > 0 and optim.warmup_fraction in [0, 1); "
                             f"got {self.base_lr}, {self.warmup_fraction}")


#: ``model.optimizer`` when none is given: the official AdamW
RECIPE_OPTIMIZER = {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95]}


def recipe_optimizer_factory(spec: Mapping[str, Any] | None) -> partial:
    """The optimiser factory of config node ``model.optimizer`` (None: :data:`RECIPE_OPTIMIZER`; a node without
    ``_target_``: AdamW). The module calls it with the parameter groups and the peak lr."""
    return component_factory(RECIPE_OPTIMIZER if spec is None else spec, "model.optimizer", "torch.optim.AdamW")


@dataclass(frozen=True)
class TokenLossConfig:
    """The loss (``model.loss``): cross-entropy label smoothing (official 0)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"expected loss.label_smoothing in [0, 1), got {self.label_smoothing}")


def check_grid(grid_classes: int, grid_per_class: int) -> None:
    """Raises ValueError for sample-grid values outside their range."""
    if grid_classes < 0 or grid_per_class < 1:
        raise ValueError(f"expected grid_classes >= 0 and grid_per_class >= 1, got {grid_classes}, {grid_per_class}")


class TokenTransformerModule(L.LightningModule):
    """The shared training loop of a class-conditional token transformer on a frozen tokenizer (see module doc)."""

    ema = None  # a varlib.training.ema.ModelEMA of the transformer when the subclass keeps one
    optim_config: RecipeOptimConfig
    optimizer_factory: partial
    loss_config: TokenLossConfig
    val_metrics: PerScaleAccumulator | None = None

    @property
    def transformer(self) -> nn.Module:
        raise NotImplementedError

    def build_transformer(self) -> nn.Module:
        """A new transformer from the module's hyperparameters (the sharded model's plain copy uses it)."""
        raise NotImplementedError

    def tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels (B,), targets (B,L), the transformer's teacher-forcing input (B,L-1,...)) of a data batch."""
        raise NotImplementedError

    def active_length(self) -> int:
        """Tokens trained at the current step (all of them)."""
        return self.transformer.L

    def setup(self, stage: str) -> None:
        """Checks the data against the model before any step, so a mismatch fails with a clear message."""
        data = self.trainer.datamodule if self.trainer is not None else None
        if data is None:
            return
        patch_nums = tuple(self.transformer.patch_nums)
        expected = {
            "patch_nums": patch_nums,
            "vocab_size": self.vae.vocab_size,
            "image_size": patch_nums[-1] * self.vae.downsample,
        }
        for name, want in expected.items():
            got = getattr(data, name, None)
            if got is not None and (tuple(got) if isinstance(got, (list, tuple)) else got) != want:
                raise ValueError(
                    f"data {name} {got} does not match the model's {want} (schedule {patch_nums} on a "
                    f"tokenizer with V={self.vae.vocab_size} and downsample {self.vae.downsample}); the last patch "
                    f"number must equal the latent side"
                )
        num_classes = getattr(data, "num_classes", None)
        if num_classes is not None and num_classes > self.transformer.num_classes:
            raise ValueError(f"data has {num_classes} classes but the model only {self.transformer.num_classes}")

    # -- steps -----------------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx):
        seed_training_step(self, self.hparams.seed)

    def training_step(self, batch, batch_idx):
        if batch is None:  # every sample of the batch was unreadable
            return None
        labels, targets_BL, x_BLCv = self.tokens_and_input(batch)
        length = self.active_length()
        logits = self.transformer(labels, x_BLCv[:, : length - 1])
        ce_BL = token_cross_entropy(logits, targets_BL[:, :length], self.loss_config.label_smoothing)
        loss = ce_BL.mean()  # uniform weight per token, as the official recipe
        metrics = PerScaleAccumulator(self.transformer.patch_nums)
        metrics.update(logits.detach(), targets_BL[:, :length],
                       None if self.loss_config.label_smoothing else ce_BL)
        stats = metrics.compute() if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0 else {}
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer):
        optim = self.optim_config
        if optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), optim.grad_clip)
            self.log("train/grad_norm", grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        total = self.trainer.estimated_stepping_batches
        wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
        for group in optimizer.param_groups:
            if group["base_weight_decay"] > 0:
                group["weight_decay"] = cosine_weight_decay(self.global_step, total, optim.weight_decay, wd_end)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update(self.transformer)

    def on_validation_epoch_start(self):
        self.val_metrics = PerScaleAccumulator(self.transformer.patch_nums)

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        labels, targets_BL, x_BLCv = self.tokens_and_input(batch)
        with self.ema_weights():
            logits = self.transformer(labels, x_BLCv)
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
        classes = min(self.hparams.grid_classes, self.transformer.num_classes)
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
        optim = self.optim_config
        peak_lr = optim.base_lr * self.global_batch_size() / 256
        groups = decay_parameter_groups(self.transformer, optim.weight_decay)
        factory = self.optimizer_factory
        # fused kernels on CUDA, as the official code, unless the config chooses or the optimiser has none
        fused = (self.device.type == "cuda" and "fused" not in factory.keywords
                 and "fused" in inspect.signature(factory.func).parameters)
        optimizer = build_component(factory, "model.optimizer", groups, lr=peak_lr, **({"fused": True} if fused else {}))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = round(optim.warmup_fraction * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lin0_lr_factor(
            step, warmup, total, optim.warmup_start, optim.end_factor, optim.flat_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_model(self):
        """FSDP2 under ``ModelParallelStrategy``: shard every block, then the root, and the EMA like them.

        With bf16 precision (on CUDA, or on CPU processes under gloo) the gathered weights are cast to bf16 and
        gradients reduced in fp32; the sharded master weights, the optimiser state and the EMA stay fp32.
        """
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"] if "data_parallel" in self.device_mesh.mesh_dim_names else self.device_mesh
        bf16 = str(self.trainer.precision).startswith("bf16")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in self.transformer.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self.transformer, mesh=mesh, mp_policy=policy)
        if self.ema is not None:  # rebuilt from the (still initial) sharded parameters: its tensors are DTensors
            self.ema = ModelEMA(self.transformer, self.ema.decay)
        self._sharded = True

    # -- whole weights: sampling, export and checkpoints ------------------------------------------------

    def ema_weights(self):
        """Context in which the transformer holds the EMA weights (nothing changes without EMA)."""
        if self.ema is None:
            return nullcontext()
        if getattr(self, "_sharded", False):
            self.transformer.reshard()  # FSDP2 keeps the root gathered after a forward without backward (validation)
        return self.ema.swap(self.transformer)

    @contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """The transformer with whole weights (the EMA's when enabled), in eval mode.

        Unsharded, this is ``self.transformer`` itself; under FSDP2 it is a plain copy holding the gathered weights, so
        that any submodule can be called alone (sampling does). Collective when sharded: enter it on every rank.
        """
        with self.ema_weights():
            if not getattr(self, "_sharded", False):
                was_training = self.transformer.training
                try:
                    yield self.transformer.eval()
                finally:
                    self.transformer.train(was_training)
                return
            self.transformer.reshard()
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.transformer.state_dict().items()}
        plain = self.build_transformer().to(device=self.device)
        plain.load_state_dict(state)
        plain.sampling = self.transformer.sampling
        yield plain.eval()

    @contextmanager
    def image_generator(self) -> Iterator[Callable[[torch.Tensor, int], torch.Tensor]]:
        """Context giving ``generate(labels_B, seed) -> (B,3,H,W) images in [0,1]`` on the (EMA) weights with the
        model's sampling settings (the hook that the FID/IS callback and the validation grid use). Collective on
        entry under FSDP2; ``generate`` calls are local."""
        with self.full_weights() as model:
            yield lambda labels_B, seed: model.generate(labels_B, seed=seed)

    def export(self, path: str | os.PathLike) -> Path:
        """Writes the transformer (EMA weights when enabled) with its tokenizer for ``varlib.load``.

        Call it on every rank: sharded (FSDP2) weights are gathered collectively, rank 0 writes the file.
        """
        with self.full_weights() as model:
            if self.global_rank == 0:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                save_var(model, path)
        return Path(path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The online weights stay in the state dict, the EMA's join it (see :mod:`varlib.training.ema`)."""
        checkpoint["varlib"] = model_metadata(self.vae, self.transformer)
        if self.ema is not None:
            checkpoint["state_dict"].update(self.ema.checkpoint_tensors())
            checkpoint["ema"] = self.ema.checkpoint_counters()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state_dict = checkpoint.get("state_dict")
        ema_tensors = pop_ema_tensors(state_dict or {})  # never reaches the strict model load
        if self.ema is None or "ema" not in checkpoint:
            return
        if state_dict is None:  # distributed checkpoint: the strategy loaded the model; read the EMA shards in place
            ema_tensors = self.ema.checkpoint_tensors()
            dcp.load({"state_dict": ema_tensors}, checkpoint_id=self.trainer.ckpt_path)
        self.ema.load_checkpoint(checkpoint["ema"], ema_tensors)
