"""What VAR's and the raster-AR baseline's Lightning modules share: their construction from the config (``model.var``
holds the :class:`~varlib.models.transformer.VARConfig` of both), the official optimisation recipe (AdamW with the
no-decay groups, the 'lin0' lr schedule, global gradient clipping, the weight-decay schedule), step-seeded
randomness, the teacher-forced cross-entropy step with per-scale metrics, EMA, FSDP2 sharding, the validation sample
grid, whole-weight sampling/export and checkpoint metadata. A text-conditional VAR (``var.conditioning`` a text spec)
trains on the captions of captioned batches where a class model takes the labels, and its grid shows prompts.

A subclass names its network class (:attr:`transformer_class`, whose ``FILE_PREFIX`` is also the module attribute
holding it, so checkpoints and model files agree) and its loss settings (:attr:`loss_class`), and implements
:meth:`tokens_and_input`. The transformer is called as ``transformer(condition, input[:, :length-1])``
(condition: labels (B,), or B captions for a text model) and returns logits (B, length, V).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import load_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from varlib.data.token_cache import read_text_encoder_config
from varlib.evaluation.per_scale import PerScaleAccumulator
from varlib.images import image_grid
from varlib.files.loading import pop_ema_tensors
from varlib.loggers import log_image
from varlib.files.format import model_metadata, save_var
from varlib.models.losses import token_cross_entropy
from varlib.models.sampling import SamplingConfig
from varlib.models.conditioning import TextConditioning
from varlib.models.text import TextFeatures
from varlib.models.transformer import AdaLNTransformer
from varlib.models.transfer import lora_scaling, merge_lora_state
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.components import build_component, component_factory
from varlib.training.settings import RecipeOptimConfig, TokenLossConfig, build_config
from varlib.training.ema import ModelEMA
from varlib.training.finetune import LoraSpec, start_transformer
from varlib.training.optim_schedules import cosine_weight_decay, decay_parameter_groups, lin0_lr_factor
from varlib.training.seeding import seed_training_step


#: ``model.optimizer`` when none is given: the official AdamW
RECIPE_OPTIMIZER = {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95]}


def recipe_optimizer_factory(spec: Mapping[str, Any] | None) -> partial:
    """The optimiser factory of config node ``model.optimizer`` (None: :data:`RECIPE_OPTIMIZER`; a node without
    ``_target_``: AdamW). The module calls it with the parameter groups and the peak lr."""
    return component_factory(RECIPE_OPTIMIZER if spec is None else spec, "model.optimizer", "torch.optim.AdamW")


def check_grid(grid_classes: int, grid_per_class: int, grid_prompts: list[str] | None = None) -> None:
    """Raises ValueError for sample-grid values outside their range."""
    if grid_classes < 0 or grid_per_class < 1:
        raise ValueError(f"expected grid_classes >= 0 and grid_per_class >= 1, got {grid_classes}, {grid_per_class}")
    if grid_prompts is not None and not all(isinstance(p, str) and p for p in grid_prompts):
        raise ValueError(f"grid_prompts must be a list of non-empty prompts, got {grid_prompts!r}")


class TokenTransformerModule(L.LightningModule):
    """The shared construction and training loop of a class-conditional token transformer on a frozen tokenizer
    (see module doc). The arguments are saved as hyperparameters (a subclass's own ones with them).

    Args:
        var: ``model.var``, the network's architecture: the fields of :class:`~varlib.models.transformer.VARConfig`
            (depth, num_classes, width, ...) as plain data, as every hyperparameter (checkpoints load with
            ``weights_only``); :func:`~varlib.training.finetune.start_transformer` builds the network from them.
        tokenizer_path: the frozen tokenizer (:func:`varlib.files.loading.load_tokenizer`); or pass it as ``vae``.
        optim: the optimisation recipe, the fields of :class:`~varlib.training.settings.RecipeOptimConfig`.
        optimizer: the optimiser as a config node ``{_target_: torch.optim.AdamW, betas: [0.9, 0.95], ...}``
            (plain data); called with the weight-decay parameter groups and the peak lr (default: the official
            AdamW, fused on CUDA).
        loss: the fields of :attr:`loss_class`.
        ema_decay: keep an EMA of the transformer used for validation, sampling and export (None = off). Under
            FSDP2 its tensors are sharded like the parameters (DTensors) and gathered on export.
        sampling: the model's ``generate`` settings (cfg, top_k, top_p) that validation samples use and the exported
            file carries; a key left out or None: :class:`~varlib.models.sampling.SamplingConfig`'s default.
        grid_classes, grid_per_class: after each validation, a grid of ``grid_per_class`` samples (rows) of
            classes 0..grid_classes-1 (columns), drawn with ``sampling`` and a fixed seed, goes to every logger
            (``val/samples``, :func:`varlib.loggers.log_image`); 0 classes, or no logger, skips it.
        grid_prompts: a text model's grid columns: these prompts (None or empty: no grid). A class model takes none.
        seed: the random draws of training step s (label dropout, drop-path) are seeded with
            seed + s * world_size + rank, so a run resumed from a checkpoint replays them exactly.
        init_from: fine-tuning: start from the weights (only) of any file ``varlib.load`` opens (official
            ``var_d16.pth``, a varlib file or folder, a checkpoint's EMA weights, a Hub name); another class count
            and patch schedule are mapped (:mod:`varlib.models.transfer`). The optimiser and step start fresh.
            ``var`` entries set to null (depth, width, num_heads, ...) take the pretrained model's values.
        class_map: new class index -> pretrained index, the classes that carry over (other rows start from the
            mean of the pretrained class rows; the null row moves to the new last index).
        class_names: one name per class, carried by the exported file (``class_names``); None takes the data's
            (image folder names, emoji categories) when it has them.
        trainable: fnmatch patterns of parameter names to train (``class_emb.*``); the rest is frozen.
        lora: LoRA adapters ``{r, alpha, dropout, target_modules}`` (peft; :class:`~varlib.training.finetune.LoraSpec`),
            the base weights frozen except the class embedding; exports merge them.
    """

    transformer_class: type[AdaLNTransformer]
    loss_class: type[TokenLossConfig] = TokenLossConfig
    ema = None  # a varlib.training.ema.ModelEMA of the transformer when ema_decay is set
    lora: LoraSpec | None = None  # model.lora when the transformer has LoRA adapters
    optim_config: RecipeOptimConfig
    optimizer_factory: partial
    loss_config: TokenLossConfig
    val_metrics: PerScaleAccumulator | None = None
    text_encoder_from: Path | None = None  # the token cache's encoder file whose weights the model's encoder took

    def __init__(
        self,
        var: Mapping[str, Any],
        tokenizer_path: str | None = None,
        vae: MultiScaleVQVAE | None = None,
        optim: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
        sampling: Mapping[str, float] | None = None,
        grid_classes: int = 8,
        grid_per_class: int = 1,
        seed: int = 0,
        init_from: str | None = None,
        class_map: Mapping[int, int] | None = None,
        class_names: list[str] | None = None,
        trainable: list[str] | None = None,
        lora: Mapping[str, Any] | None = None,
        grid_prompts: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["vae"])
        hparams = self.hparams
        self.optim_config = build_config(RecipeOptimConfig, hparams.optim, "model.optim")
        self.optimizer_factory = recipe_optimizer_factory(hparams.optimizer)
        self.loss_config = build_config(self.loss_class, hparams.loss, "model.loss")
        check_grid(hparams.grid_classes, hparams.grid_per_class, hparams.grid_prompts)
        transformer, self.lora = start_transformer(
            self.transformer_class, hparams.var, type(self).__name__, tokenizer_path=hparams.tokenizer_path, vae=vae,
            init_from=hparams.init_from, class_map=hparams.class_map, class_names=hparams.class_names,
            trainable=hparams.trainable, lora=hparams.lora, **self.runtime_settings())
        transformer.sampling = SamplingConfig.from_dict(hparams.sampling or {})
        self.vae = transformer.vae
        setattr(self, self.transformer_class.FILE_PREFIX, transformer)
        if hparams.grid_prompts and not self.text_conditional:
            raise ValueError(f"model.grid_prompts are for a text-conditional model (var.conditioning type text); "
                             f"this one is conditioned on classes, got grid_prompts={list(hparams.grid_prompts)}")
        self.ema = ModelEMA(transformer, hparams.ema_decay) if hparams.ema_decay else None
        self._validation_copy: list[nn.Module] = []  # full_weights' copy during a validation's end

    def runtime_settings(self) -> dict[str, Any]:
        """The network's settings that its file does not record (none here; VAR's attention and recomputation)."""
        return {}

    @property
    def transformer(self) -> AdaLNTransformer:
        return getattr(self, self.transformer_class.FILE_PREFIX)

    @property
    def text_conditional(self) -> bool:
        """Whether the transformer is conditioned on text (it then trains on captions, not labels)."""
        return isinstance(self.transformer.conditioning, TextConditioning)

    def batch_condition(self, labels: torch.Tensor, text: list) -> torch.Tensor | list[str] | TextFeatures:
        """What the transformer is conditioned on, from a batch's labels and what follows them (``text``: nothing,
        the B captions, or the captions and their precomputed features): a class model's labels (int64), a text
        model's caption features when the batch has them, else its captions (encoded by the model)."""
        if not self.text_conditional:
            return labels.long()
        if not text:
            raise ValueError("a text-conditional VAR trains on captioned batches (tokens or images, labels, "
                             "captions), got batches without captions: set data.captions=true")
        if len(text) == 2:
            features = text[1]
            return TextFeatures(features["tokens"], features["mask"], features["pooled"])
        return list(text[0])

    def take_text_encoder(self, path: Path) -> None:
        """Training on precomputed text features: the model's frozen encoder must be configured as the one that
        computed them (saved at ``path``) and takes its weights, so that prompts are encoded as the captions were.
        Once per module: a later stage (the validation after fit) must not reset the EMA."""
        if self.text_encoder_from == Path(path):
            return
        encoder = self.transformer.conditioning.encoder
        cached, mine = read_text_encoder_config(path), json.loads(json.dumps(encoder.config))
        if not encoder.frozen or cached != mine:
            raise ValueError(f"the token cache's text features come from the frozen encoder {cached} ({path}); "
                             f"expected model.var.conditioning.encoder alike, got {mine} (frozen={encoder.frozen})")
        load_model(encoder, str(path))
        if self.ema is not None:  # its copy of the encoder must hold these weights too
            self.ema = ModelEMA(self.transformer, self.ema.decay)
        self.text_encoder_from = Path(path)

    def check_token_batch(self, tokens: torch.Tensor) -> None:
        """Raises ValueError unless a token-cache batch is (B, L) for the model's L."""
        if tokens.ndim != 2 or tokens.shape[1] != self.transformer.L:
            raise ValueError(f"token batches must be (B, L={self.transformer.L}), got {tuple(tokens.shape)}")

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
        if self.text_conditional:  # the data's classes only score a text model's samples
            if getattr(data, "captions", None) is False:
                raise ValueError("a text-conditional VAR trains on captions: expected data.captions=true, got false")
            if getattr(data, "text_encoder_path", None) is not None:
                self.take_text_encoder(data.text_encoder_path)
            return
        num_classes = getattr(data, "num_classes", None)
        if num_classes is not None and num_classes > self.transformer.num_classes:
            raise ValueError(f"data has {num_classes} classes but the model only {self.transformer.num_classes}")
        names = getattr(data, "class_names", None)
        if self.transformer.class_names is None and names is not None and len(names) == self.transformer.num_classes:
            self.transformer.class_names = list(names)  # the exported file names the classes as the data does

    # -- steps -----------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A class model's labels are checked here, on the host: the forward checks only host tensors (reading the
        values of device labels would synchronise the host with the device at every step)."""
        if batch is not None and not self.text_conditional:
            self.transformer.check_labels(torch.as_tensor(batch[1]))
        return batch

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
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:  # an argmax over (B,L,V): logged steps only
            metrics = PerScaleAccumulator(self.transformer.patch_nums)
            metrics.update(logits.detach(), targets_BL[:, :length],
                           None if self.loss_config.label_smoothing else ce_BL)
            self.log_dict({f"train/{k}": v for k, v in metrics.compute().items()})
        return loss

    def on_before_optimizer_step(self, optimizer):
        optim = self.optim_config
        if optim.grad_clip is not None:
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
        """Samples of the first classes, or a text model's ``grid_prompts``, to every logger
        (:func:`~varlib.loggers.log_image`). Every rank samples (a sharded model's forward is collective),
        rank 0 logs; a fixed seed makes grids of successive validations comparable."""
        if self.text_conditional:
            columns = list(self.hparams.grid_prompts or [])
        else:
            columns = torch.arange(min(self.hparams.grid_classes, self.transformer.num_classes), device=self.device)
        if not self.loggers or len(columns) == 0 or self.trainer.sanity_checking:
            return
        per_column = self.hparams.grid_per_class
        condition = columns * per_column if self.text_conditional else columns.repeat(per_column)
        with self.image_generator() as generate:
            images_BCHW = generate(condition, self.hparams.seed)
        log_image(self.trainer, "val/samples", image_grid(images_BCHW.float().cpu(), columns=len(columns)),
                  self.global_step)

    # -- optimisation ----------------------------------------------------------------------------

    def global_batch_size(self) -> int:
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if batch is None:
            raise ValueError("cannot infer the global batch size; give the DataModule a batch_size")
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        optim = self.optim_config
        groups = decay_parameter_groups(self.transformer, optim.weight_decay)
        factory = self.optimizer_factory
        # fused kernels on CUDA, as the official code, unless the config chooses or the optimiser has none
        fused = (self.device.type == "cuda" and "fused" not in factory.keywords
                 and "fused" in inspect.signature(factory.func).parameters)
        optimizer = build_component(factory, "model.optimizer", groups, lr=optim.lr, **({"fused": True} if fused else {}))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = round(optim.warmup_fraction * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lin0_lr_factor(
            step, warmup, total, optim.warmup_start, optim.end_factor, optim.flat_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_model(self):
        """FSDP2 under ``ModelParallelStrategy``: shard every block, then the root, and the EMA like them.

        With bf16 precision (on CUDA, or on CPU processes under gloo) the blocks' gathered weights are cast to bf16
        and gradients reduced in fp32; the sharded master weights, the optimiser state and the EMA stay fp32. The
        numerics are those of DDP under the same autocast: the blocks do not cast their inputs
        (``cast_forward_inputs`` would make the residual stream bf16 under FSDP2 alone), and the root (embeddings,
        head) keeps fp32 weights, so the embeddings are computed in fp32 and autocast casts for the head as it does
        under DDP.
        """
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"] if "data_parallel" in self.device_mesh.mesh_dim_names else self.device_mesh
        if str(self.trainer.precision).startswith("bf16"):
            block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                cast_forward_inputs=False)
        else:
            block_policy = MixedPrecisionPolicy()
        for block in self.transformer.blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        fully_shard(self.transformer, mesh=mesh, mp_policy=MixedPrecisionPolicy())
        if self.ema is not None:  # rebuilt from the (still initial) sharded parameters: its tensors are DTensors
            self.ema = ModelEMA(self.transformer, self.ema.decay)
        self._sharded = True

    # -- whole weights: sampling, export and checkpoints ------------------------------------------------

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Context in which the transformer holds the EMA weights (nothing changes without EMA)."""
        if self.ema is None:
            yield
            return
        # FSDP2 keeps the root gathered after a forward without backward (validation): resharded on entry, so that
        # the EMA's shards are gathered, and on exit, so that the next training forward gathers the training
        # weights rather than reusing the EMA values gathered inside.
        self._reshard()
        try:
            with self.ema.swap(self.transformer):
                yield
        finally:
            self._reshard()

    def _reshard(self) -> None:
        if getattr(self, "_sharded", False):
            self.transformer.reshard()

    @contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """The transformer with whole weights (the EMA's when enabled), in eval mode.

        Unsharded without LoRA, this is ``self.transformer`` itself; under FSDP2 or with LoRA it is a plain copy
        holding the gathered weights (the adapters merged), so that any submodule can be called alone (sampling
        does) and exports open without peft. Collective when sharded: enter it on every rank. The end of a
        validation (the FID callback, then the sample grid) shares one copy: the weights do not change in between.
        """
        if not getattr(self, "_sharded", False) and self.lora is None:
            with self.ema_weights():
                was_training = self.transformer.training
                try:
                    yield self.transformer.eval()
                finally:
                    self.transformer.train(was_training)
            return
        if not self._validation_copy:
            plain = self._plain_copy()
            if self._trainer is None or not self.trainer.validating:
                yield plain.eval()
                return
            self._validation_copy.append(plain)  # a list: an nn.Module attribute would become a submodule
        yield self._validation_copy[0].eval()

    def on_validation_end(self) -> None:
        self._validation_copy.clear()

    def _plain_copy(self) -> nn.Module:
        """A plain transformer holding the whole (EMA) weights, the adapters merged (see :meth:`full_weights`)."""
        with self.ema_weights():
            self._reshard()
            # copies: leaving ema_weights() writes the online weights back into these parameters
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
                     for k, v in self.transformer.state_dict().items()}
        if self.lora is not None:  # a plain copy with the adapters merged, which opens without peft
            state = merge_lora_state(state, lora_scaling(self.lora.as_dict()))
        with torch.device(self.device):  # built where it runs: initialising a large model on the CPU takes long
            plain = self.transformer_class(self.vae, self.transformer.var_config, **self.runtime_settings())
        plain.load_state_dict(state)
        plain.sampling, plain.class_names = self.transformer.sampling, self.transformer.class_names
        return plain

    @contextmanager
    def image_generator(self) -> Iterator[Callable[[torch.Tensor, int], torch.Tensor]]:
        """Context giving ``generate(labels_B or prompts, seed) -> (B,3,H,W) images in [0,1]`` on the (EMA) weights
        with the model's sampling settings (the hook that the FID/IS callback and the validation grid use).
        Collective on entry under FSDP2; ``generate`` calls are local."""
        # Lightning autocasts only the *_step hooks: sampling here (the grid, the FID callback) runs in the trainer's
        # precision explicitly, as varlib-evaluate samples in bf16 on GPUs
        forward_context = self.trainer.precision_plugin.forward_context if self._trainer is not None else nullcontext

        def generate(condition, seed: int) -> torch.Tensor:
            with forward_context():
                return model.generate(condition, seed=seed)

        with self.full_weights() as model:
            yield generate

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
        if self.lora is not None:  # varlib.load merges the adapters of the checkpoint's weights
            checkpoint["varlib"]["lora"] = json.dumps(self.lora.as_dict())
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
