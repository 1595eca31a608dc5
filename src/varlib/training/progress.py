"""A progress bar over the whole run's optimiser steps, with an ETA, for step-defined runs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but the training bar counts ``trainer.global_step`` up to ``trainer.max_steps``
    across epochs (Lightning's restarts at every epoch), so its ETA is the time left in the run. A resumed run
    starts the bar at the resumed step. Without ``max_steps`` it behaves like ``TQDMProgressBar``.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_start(trainer)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this fit (fresh or resumed)
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step
            bar.n = trainer.global_step
        bar.set_description(f"{trainer.lightning_module.__class__.__name__} steps (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            bar.update(step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
