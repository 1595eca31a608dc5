"""``varlib-train``: trains any varlib LightningModule (tokenizer or VAR) from a Hydra config, then exports it.

    varlib-train experiment=tokenizer_emoji
    python -m varlib.cli.train experiment=tokenizer_emoji trainer.max_steps=200 model.optim.lr=3e-4
    varlib-train --multirun experiment=tokenizer_emoji model.optim.lr=1e-4,3e-4

``cfg.data``, ``cfg.model``, ``cfg.callbacks.*``, ``cfg.logger.*`` and ``cfg.trainer`` are built with
``hydra.utils.instantiate``; the model must have an ``export(path)`` method. A run writes to
``outputs/<task_name>/`` (multirun: ``multirun/<task_name>/<job number>/``), so running the same command again
resumes from ``<output_dir>/checkpoints/last.ckpt``. At the end, global rank 0 writes ``<output_dir>/<export_name>``
and ``<output_dir>/metrics.json`` (the final validation metrics as plain floats).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from varlib.cli.common import CONFIG_PATH

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Builds every entry of a named group such as ``cfg.callbacks``; entries set to null are skipped."""
    if group is None:
        return []
    return [instantiate(node) for node in group.values() if node is not None]


def resume_checkpoint(checkpoint_dir: Path, resume: bool) -> Path | None:
    """``checkpoint_dir/last.ckpt`` when resuming is on and the file exists, else None (a fresh run)."""
    last = checkpoint_dir / LAST_CHECKPOINT
    return last if resume and last.is_file() else None


def final_metrics(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, validate: bool) -> dict[str, float]:
    """The validation metrics of the final weights: a fresh validation pass, or the last logged values."""
    if validate:
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        if results:
            return {name: float(value) for name, value in results[0].items()}
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}


def run(cfg: DictConfig) -> dict[str, float]:
    """Trains with a composed config and returns the final validation metrics (see the module docstring)."""
    if not str(cfg.export_name).endswith(".safetensors"):
        raise ValueError(f"export_name must end with '.safetensors', got {cfg.export_name!r}")
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if not callable(getattr(model, "export", None)):
        raise ValueError(f"cfg.model must build a LightningModule with an export(path) method, got {type(model).__name__}")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    checkpoint = resume_checkpoint(checkpoint_dir, cfg.resume)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    # The last validation may precede the last step: save the end state so a re-run resumes from it.
    trainer.save_checkpoint(checkpoint_dir / LAST_CHECKPOINT, weights_only=False)
    metrics = final_metrics(trainer, model, datamodule, cfg.final_validation)

    export_path = model.export(output_dir / cfg.export_name)  # every rank: sharded weights are gathered
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        log.info("exported %s; final metrics %s", export_path, metrics)
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg)


if __name__ == "__main__":
    main()
