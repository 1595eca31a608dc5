"""Training from a composed ``train`` config: what ``varlib-train`` runs, callable from Python.

``cfg.data``, ``cfg.model``, ``cfg.callbacks.*``, ``cfg.logger.*`` and ``cfg.trainer`` are built with
``hydra.utils.instantiate``; the model must have an ``export(path)`` method. A run writes to
``cfg.paths.output_dir``, so running the same config again resumes from ``<output_dir>/checkpoints/last.ckpt`` (a
file, or a folder under FSDP2; an incomplete one falls back to the newest complete checkpoint, saying so).
A resumed run must have been started with the same settings, except those that may change on resume
(:mod:`varlib.training.run_config`: the resolved config is kept in ``<output_dir>/run_config.yaml``);
``resume=force`` continues anyway, ``resume=false`` starts afresh. A run stopped by a signal
(:class:`~varlib.training.preemption.StepCheckpoint`) saves ``last.ckpt`` and returns without exporting.
``data.global_batch_size`` (when set) fixes the batch over all processes and accumulation steps, and sets
``data.batch_size`` per device from it. At the end, global rank 0 writes ``<output_dir>/<export_name>`` and
``<output_dir>/metrics.json`` (the final validation metrics as plain floats).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint import FileSystemReader

from varlib.configs import compose_config, datamodule_config, device_count, instantiate_config
from varlib.files.loading import DISTRIBUTED_CHECKPOINT_INDEX, LAST_CHECKPOINT, LIGHTNING_META_NAME
from varlib.training.preemption import StepCheckpoint
from varlib.training.run_config import check_resume_mode, check_run_config, record_run_config

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Builds every entry of a named group such as ``cfg.callbacks``; entries set to null are skipped."""
    if group is None:
        return []
    return [instantiate_config(node) for node in group.values() if node is not None]


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it is complete.

    A file must load (``weights_only``); a distributed checkpoint folder (FSDP2) must hold Lightning's
    ``meta.pt`` and a ``.metadata`` whose shard files all exist at least as long as it says.
    """
    try:
        if not path.is_dir():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return None
        if not (path / DISTRIBUTED_CHECKPOINT_INDEX).is_file():
            return f"the folder has no {DISTRIBUTED_CHECKPOINT_INDEX}: its save was interrupted"
        for item, storage in FileSystemReader(path).read_metadata().storage_data.items():
            shard = path / storage.relative_path
            if not shard.is_file() or shard.stat().st_size < storage.offset + storage.length:
                return f"shard {storage.relative_path} is missing or shorter than its .metadata says (entry {item.fqn})"
        if not (path / LIGHTNING_META_NAME).is_file():
            return f"the folder has no {LIGHTNING_META_NAME}: its save was interrupted"
        torch.load(path / LIGHTNING_META_NAME, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and the checkpoint reader raise several types for damaged files
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def resume_checkpoint(checkpoint_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a re-run continues from: ``checkpoint_dir/last.ckpt`` (file or folder) when resuming is
    on and it exists, else None (a fresh run).

    An incomplete or corrupt last checkpoint (a save cut short by a kill) falls back, with a warning naming
    both, to the newest complete ``*.ckpt`` beside it; without one it raises a ValueError naming it.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    if not resume or not last.exists():
        return None
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    others = sorted((p for p in checkpoint_dir.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in others:
        if checkpoint_problem(candidate) is None:
            log.warning("the last checkpoint %s is incomplete or corrupt (%s); falling back to %s", last, problem, candidate)
            return candidate
    raise ValueError(
        f"cannot resume: the last checkpoint {last} is incomplete or corrupt ({problem}) and no other checkpoint "
        f"in {checkpoint_dir} is complete; remove it to start over, or set resume=false"
    )


def per_device_batch_size(global_batch_size: int, devices: int, num_nodes: int, accumulate_grad_batches: int) -> int:
    """``global_batch_size / (devices * num_nodes * accumulate_grad_batches)``; refuses a value that does not
    divide, naming all four numbers."""
    share = devices * num_nodes * accumulate_grad_batches
    if global_batch_size < 1 or global_batch_size % share:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} must be a positive multiple of trainer devices x num_nodes x "
            f"accumulate_grad_batches = {devices} x {num_nodes} x {accumulate_grad_batches} = {share}"
        )
    return global_batch_size // share


def apply_global_batch_size(cfg: DictConfig) -> None:
    """Sets ``cfg.data.batch_size`` from ``cfg.data.global_batch_size`` when that is given."""
    global_batch_size = cfg.data.get("global_batch_size")
    if global_batch_size is None:
        return
    cfg.data.batch_size = per_device_batch_size(
        int(global_batch_size), device_count(cfg.trainer.devices, cfg.trainer.accelerator),
        int(cfg.trainer.num_nodes), int(cfg.trainer.accumulate_grad_batches))
    log.info("global batch %d: data.batch_size=%d per device", global_batch_size, cfg.data.batch_size)


def save_end_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Saves the state at the end of ``fit`` (the last validation may precede the last step) for a re-run to resume.

    Lightning's own checkpoints are taken before a step's logging counter moves on, and its restore adds one; this
    one is taken after, so it records the counter one lower as theirs do (else a resumed run's logs skip a step).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._batches_that_stepped -= 1
    try:
        trainer.save_checkpoint(path, weights_only=False)
    finally:
        epoch_loop._batches_that_stepped += 1


def final_metrics(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, validate: bool) -> dict[str, float]:
    """The validation metrics of the final weights: a fresh validation pass, or the last logged values."""
    if validate:
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        if results:
            return {name: float(value) for name, value in results[0].items()}
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains with a composed ``train`` config and returns the final validation metrics (see the module docstring)."""
    if not str(cfg.export_name).endswith(".safetensors"):
        raise ValueError(f"export_name must end with '.safetensors', got {cfg.export_name!r}")
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)

    check_resume_mode(cfg.resume)
    apply_global_batch_size(cfg)
    checkpoint = resume_checkpoint(checkpoint_dir, cfg.resume is not False)
    if checkpoint is not None:
        check_run_config(cfg, output_dir)
    datamodule = instantiate_config(datamodule_config(cfg.data))
    model = instantiate_config(cfg.model)
    if not callable(getattr(model, "export", None)):
        raise ValueError(f"cfg.model must build a LightningModule with an export(path) method, got {type(model).__name__}")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate_config(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    record_run_config(cfg, output_dir)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    stopped = next((c for c in callbacks if isinstance(c, StepCheckpoint) and c.stopped_by is not None), None)
    if stopped is not None:  # last.ckpt is saved: no export, the same command continues
        log.info("stopped by %s at step %d; run the same command to resume from %s", stopped.stopped_by,
                 trainer.global_step, checkpoint_dir / LAST_CHECKPOINT)
        return {}
    save_end_checkpoint(trainer, checkpoint_dir / LAST_CHECKPOINT)
    metrics = final_metrics(trainer, model, datamodule, cfg.final_validation)

    export_path = model.export(output_dir / cfg.export_name)  # every rank: sharded weights are gathered
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        log.info("exported %s; final metrics %s", export_path, metrics)
    return metrics


def train_experiment(experiment: str, out_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """``varlib-train experiment=<experiment> <overrides>`` writing to ``out_dir``; returns its final val metrics."""
    return train(compose_config("train", [f"experiment={experiment}", f"paths.output_dir={out_dir}", *overrides]))
