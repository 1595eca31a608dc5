"""Checkpoints at step boundaries besides validation: when the job is told to stop, and periodically.

A scheduler warns before it stops a job: SLURM sends SIGTERM before killing (and the signal asked for with
``--signal=USR1@120`` two minutes before the time limit), spot instances and Kubernetes send SIGTERM. The handler
only notes the signal; at the end of the current step every rank agrees (one all-reduce of a flag), saves
``last.ckpt`` and stops, so the run exits cleanly and the same command resumes from there. Under SLURM a SIGUSR1
also requeues the job (``scontrol requeue``, what Lightning's ``SLURMEnvironment(auto_requeue=True)`` runs, but
after the save at a step boundary rather than inside the signal handler). The handlers are installed when training
starts, before the loaders fork their workers: the workers inherit them, so a signal sent to every process of the
job does not kill them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

from varlib.files.loading import LAST_CHECKPOINT

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (array jobs: ``<job>_<task>``), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class StepCheckpoint(L.Callback):
    """Saves ``<dirpath>/last.ckpt`` at a step boundary: after a stop signal (then stops training), every
    ``every_n_steps`` optimiser steps and every ``every_n_minutes`` minutes of training (either or both; null: off),
    counted from the start of this run or its last save.

    Args:
        dirpath: the checkpoint folder a re-run resumes from (``paths.checkpoint_dir``).
        signals: names of the signals that stop the run (e.g. ``[SIGTERM, SIGUSR1]``); an empty list handles none.
        requeue_signals: those of ``signals`` after which a SLURM job is requeued once saved.
        every_n_steps, every_n_minutes: periodic saves (they do not stop the run).

    ``stopped_by`` names the signal that stopped the run, None otherwise.
    """

    def __init__(self, dirpath: str, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
                 requeue_signals: Sequence[str] = ("SIGUSR1",), every_n_steps: int | None = None,
                 every_n_minutes: float | None = None) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("every_n_minutes", every_n_minutes)):
            if value is not None and value <= 0:
                raise ValueError(f"callbacks.step_checkpoint.{name} must be positive or null, got {value}")
        for name in (*signals, *requeue_signals):
            if not isinstance(getattr(signal, str(name), None), signal.Signals):
                raise ValueError(f"callbacks.step_checkpoint: expected signal names such as SIGTERM, got {name!r}")
        if not set(requeue_signals) <= set(signals):
            raise ValueError(f"callbacks.step_checkpoint.requeue_signals {list(requeue_signals)} must be among "
                             f"signals {list(signals)}")
        self.dirpath = Path(dirpath)
        self.signals = [signal.Signals[str(name)] for name in signals]
        self.requeue_signals = {signal.Signals[str(name)] for name in requeue_signals}
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.received: signal.Signals | None = None
        self.stopped_by: str | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._saved_step, self._saved_time = 0, time.monotonic()

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replaces Lightning's SIGTERM handler (installed just before), which aborts the step without a checkpoint.
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._note)
        self._saved_step, self._saved_time = trainer.global_step, time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        step = trainer.global_step
        periodic = (self.every_n_steps is not None and step - self._saved_step >= self.every_n_steps) or (
            self.every_n_minutes is not None and time.monotonic() - self._saved_time >= 60 * self.every_n_minutes)
        if self.every_n_minutes is not None:  # every rank must take the same decision (clocks differ)
            periodic = trainer.strategy.reduce_boolean_decision(periodic, all=False)
        if not (stop or periodic):
            return
        path = self.dirpath / LAST_CHECKPOINT
        trainer.save_checkpoint(path, weights_only=False)
        self._saved_step, self._saved_time = step, time.monotonic()
        if not stop:
            return
        self.stopped_by = self.received.name if self.received is not None else "a signal on another rank"
        # Ends fit after this step. Not trainer.should_stop: Lightning validates before an early stop, and the
        # checkpoint written after that validation would replace this one with a state it resumes one batch off.
        trainer.fit_loop.epoch_loop.max_steps = step
        log.info("%s: saved %s at step %d; stopping", self.stopped_by, path, step)
        job = slurm_job_id()
        if self.received in self.requeue_signals and job is not None and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.info("requeued SLURM job %s", job)
            else:
                log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
