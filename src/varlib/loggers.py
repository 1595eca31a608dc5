"""Loggers that keep a run's history across resumes, and images logged through each logger's own API.

A resumed run continues its logs where its checkpoint was taken. The killed segment may have logged steps after
that checkpoint; the resumed one logs them again. So when a segment logs for the first time, at step k, what
earlier segments logged at steps >= k is dropped: the history holds every step once.

- :class:`CSVLogger`: ``metrics.csv`` is kept and appended to (Lightning's deletes it), rows written every step;
- :class:`TensorBoardLogger`: the same version folder; a new segment writes TensorBoard's purge marker (a session
  start at step k), so events at steps >= k from earlier event files are hidden, as ``SummaryWriter(purge_step=k)``;
- :class:`WandbLogger`: the same W&B run (its id is kept in ``<save_dir>/wandb_run_id``, ``resume="allow"``).
  W&B appends: rows a killed segment logged after its checkpoint stay in the W&B history beside the new ones.

:func:`log_image` sends an image to every logger of a trainer: TensorBoard's ``add_image``, W&B's ``log_image``,
and PNG files under the CSV logger's folder (``images/<key>/step_<step>.png``).
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from varlib.images import save_png, to_pil


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv``: its header is read at start, and this
    writer's first save drops the earlier rows at or after the first step it saves."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._cut_pending = os.path.isfile(self.metrics_file_path)
        if self._cut_pending:
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes ``metrics.csv`` here."""

    def save(self) -> None:
        if self.metrics and self._cut_pending:
            first_step = min(int(row["step"]) for row in self.metrics)
            with open(self.metrics_file_path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(float(row["step"])) < first_step]
            with open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._cut_pending = False
        super().save()


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger appending to ``<save_dir>/<name>/<version>/metrics.csv`` across resumes (module
    docstring); ``flush_logs_every_n_steps`` defaults to 1 so that a kill loses no logged row."""

    def __init__(self, save_dir: str, name: str = "csv", version: int | str | None = "",
                 flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps,
                         **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger whose first metrics of a segment, at step k, hide what earlier event files in
    the same folder hold at steps >= k (TensorBoard's purge on a session start; module docstring)."""

    _purge_marked = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._purge_marked and step is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            writer = self.experiment._get_file_writer()
            writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            self._purge_marked = True
        super().log_metrics(metrics, step)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger continuing one W&B run per run folder: without an ``id``, the id is read from
    ``<save_dir>/wandb_run_id`` or made and written there (``resume="allow"``). ``offline=True`` logs to files
    only (``wandb sync`` uploads them later)."""

    RUN_ID_FILENAME = "wandb_run_id"

    def __init__(self, save_dir: str, id: str | None = None, **kwargs: Any) -> None:  # noqa: A002 (W&B's name)
        if id is None and rank_zero_only.rank == 0:
            id_file = Path(save_dir) / self.RUN_ID_FILENAME
            if not id_file.is_file():
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(secrets.token_hex(4) + "\n")
            id = id_file.read_text().strip()
        super().__init__(save_dir=save_dir, id=id, **kwargs)


def log_image(trainer: L.Trainer, key: str, image_3HW: torch.Tensor, step: int) -> None:
    """Logs one float image (3,H,W) in [0,1] (e.g. a grid) under ``key`` at ``step`` to each of the trainer's
    loggers, through its own API: TensorBoard ``add_image``, W&B ``log_image``, a CSV logger's
    ``<log_dir>/images/<key with / as _>/step_<step>.png``. Call it on every rank; global rank 0 writes."""
    if not trainer.is_global_zero:
        return
    image_3HW = image_3HW.detach().float().clamp(0, 1).cpu()
    for logger in trainer.loggers:
        if isinstance(logger, LightningTensorBoardLogger):
            logger.experiment.add_image(key, image_3HW, step)
        elif isinstance(logger, LightningWandbLogger):
            logger.log_image(key, [to_pil(image_3HW)], step=step)
        elif isinstance(logger, LightningCSVLogger):
            save_png(image_3HW, Path(logger.log_dir) / "images" / key.replace("/", "_") / f"step_{step:08d}.png")
