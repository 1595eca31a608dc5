"""Runs that never lose anything, in process: the resume check of a run's settings, loggers that keep their history
across a resume (CSV, TensorBoard, W&B offline), images through each logger, callback state in the checkpoint, and
the step-boundary checkpoint's settings. The end-to-end kills and resumes are in test_cli_resume.py."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from varlib.evaluation.scaling_callback import ScalingRecordCallback
from varlib.loggers import CSVLogger, TensorBoardLogger, log_image
from varlib.training.preemption import StepCheckpoint, slurm_job_id
from varlib.training.run_config import (
    RUN_CONFIG_FILENAME, check_resume_mode, check_run_config, config_changes, flatten, record_run_config,
)

STARTED = {
    "seed": 0, "resume": True, "cpu_threads": None,
    "data": {"global_batch_size": 768, "batch_size": 96, "num_workers": 4, "root": "cache"},
    "model": {"var": {"depth": 16, "width": 1024}, "optim": {"lr": 1e-4}},
    "trainer": {"devices": 8, "num_nodes": 1, "accumulate_grad_batches": 1, "max_steps": 100, "log_every_n_steps": 10},
    "logger": {"tensorboard": {"save_dir": "out"}},
}


def changed(**updates: object) -> dict:
    config = OmegaConf.create(STARTED)
    for key, value in updates.items():
        OmegaConf.update(config, key.replace("__", "."), value, force_add=True)
    return OmegaConf.to_container(config)


def test_flatten_gives_dotted_keys_and_keeps_lists_whole():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}


def test_resumable_changes_pass_and_every_other_difference_is_listed():
    assert config_changes(STARTED, changed(trainer__max_steps=200, data__num_workers=8, trainer__log_every_n_steps=1,
                                           logger={"csv": {"save_dir": "out"}}, resume="force")) == {}
    assert config_changes(STARTED, changed(model__var__depth=2, model__optim__lr=1e-3, seed=1)) == {
        "model.optim.lr": (1e-4, 1e-3), "model.var.depth": (16, 2), "seed": (0, 1)}
    # a key that appears or disappears is a change too
    assert config_changes(STARTED, changed(model__var__qk_norm=True)) == {"model.var.qk_norm": ("<absent>", True)}


def test_devices_may_change_only_when_the_global_batch_is_kept():
    assert config_changes(STARTED, changed(trainer__devices=4, data__batch_size=192)) == {}
    assert config_changes(STARTED, changed(trainer__num_nodes=2, data__batch_size=48)) == {}
    assert config_changes(STARTED, changed(trainer__devices=4, data__global_batch_size=384)) == {
        "data.global_batch_size": (768, 384), "trainer.devices": (8, 4)}
    per_device = changed(data__global_batch_size=None)  # no global batch: more devices make a larger batch
    assert config_changes(per_device, changed(data__global_batch_size=None, trainer__devices=4)) == {
        "trainer.devices": (8, 4)}


def test_a_changed_resume_lists_each_key_and_the_ways_on(tmp_path):
    record_run_config(OmegaConf.create(STARTED), tmp_path)
    assert (tmp_path / RUN_CONFIG_FILENAME).is_file()
    check_run_config(OmegaConf.create(changed(trainer__max_steps=300)), tmp_path)
    with pytest.raises(ValueError) as error:
        check_run_config(OmegaConf.create(changed(model__var__depth=2)), tmp_path)
    message = str(error.value)
    assert "model.var.depth: 16 -> 2" in message and "resume=false" in message and "resume=force" in message
    assert "max_steps" not in message
    forced = OmegaConf.create(changed(model__var__depth=2, resume="force"))
    check_run_config(forced, tmp_path)  # continues; the run's config becomes the new one
    record_run_config(forced, tmp_path)
    check_run_config(OmegaConf.create(changed(model__var__depth=2)), tmp_path)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="resume: expected true, false or force"):
            check_resume_mode(bad)
    for good in (True, False, "force"):
        check_resume_mode(good)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_keeps_history_and_drops_what_a_killed_segment_logged_after_its_checkpoint(tmp_path):
    first = CSVLogger(str(tmp_path))
    for step in range(8):  # the killed segment: its checkpoint was at step 5, it logged up to 7
        first.log_metrics({"train/loss": float(step)}, step)
    first.log_metrics({"val/loss": 10.0}, 4)
    metrics_file = Path(first.log_dir) / "metrics.csv"
    assert len(read_rows(metrics_file)) == 9  # every row on disk at once: a kill loses none

    resumed = CSVLogger(str(tmp_path))
    for step in range(5, 10):
        resumed.log_metrics({"train/loss": 100.0 + step, "train/grad_norm": 1.0}, step)
    resumed.finalize("success")
    rows = read_rows(metrics_file)
    train_steps = [int(row["step"]) for row in rows if row["train/loss"]]
    assert train_steps == list(range(10))
    assert [float(row["train/loss"]) for row in rows if row["train/loss"]] == [0, 1, 2, 3, 4, 105, 106, 107, 108, 109]
    assert [row["val/loss"] for row in rows if row["val/loss"]] == ["10.0"]
    assert set(rows[0]) == {"step", "train/loss", "val/loss", "train/grad_norm"}


def test_tensorboard_logger_continues_and_hides_steps_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLogger(str(tmp_path), name="tb", version="")
    for step in range(8):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finalize("killed")
    resumed = TensorBoardLogger(str(tmp_path), name="tb", version="")
    for step in range(5, 10):
        resumed.log_metrics({"train/loss": 100.0 + step}, step)
    resumed.finalize("success")
    assert resumed.log_dir == first.log_dir and len(list(Path(first.log_dir).glob("events.out.*"))) == 2
    events = EventAccumulator(first.log_dir)
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(10))
    assert [e.value for e in scalars] == [0, 1, 2, 3, 4, 105, 106, 107, 108, 109]


class FakeTrainer:
    def __init__(self, loggers):
        self.loggers, self.is_global_zero = loggers, True


def test_images_go_through_each_loggers_own_api(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = pytest.importorskip("wandb")
    from varlib.loggers import WandbLogger

    csv_logger = CSVLogger(str(tmp_path))
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    wandb_logger = WandbLogger(str(tmp_path / "wandb"), offline=True, project="varlib-test")
    image = torch.zeros(3, 6, 10)
    image[0] = 1.0  # red
    log_image(FakeTrainer([csv_logger, tb_logger, wandb_logger]), "val/samples", image, 7)

    png = Path(csv_logger.log_dir) / "images" / "val_samples" / "step_00000007.png"
    assert Image.open(png).size == (10, 6) and Image.open(png).getpixel((3, 3)) == (255, 0, 0)
    tb_logger.finalize("success")
    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    (logged,) = events.Images("val/samples")
    assert (logged.step, logged.width, logged.height) == (7, 10, 6)
    run = wandb_logger.experiment
    assert run.summary["val/samples"]["_type"] == "images/separated" and run.summary["trainer/global_step"] == 7
    run_id = run.id
    wandb.finish()
    assert (tmp_path / "wandb" / "wandb_run_id").read_text().strip() == run_id
    # the same run folder continues the same W&B run
    assert WandbLogger(str(tmp_path / "wandb"), offline=True, project="varlib-test").version == run_id


def test_scaling_record_points_travel_in_the_checkpoint(tmp_path):
    callback = ScalingRecordCallback()
    callback.points = [{"compute": 1.0e9, "loss_avg": 3.0, "loss_last": 3.1, "err_avg": 0.9, "err_last": 0.95},
                       {"compute": 2.0e9, "loss_avg": 2.5, "loss_last": 2.7, "err_avg": 0.8, "err_last": 0.9}]
    torch.save({"callbacks": {"scaling": callback.state_dict()}}, tmp_path / "c.ckpt")
    restored = ScalingRecordCallback()
    restored.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["scaling"])
    assert restored.points == callback.points and restored.points is not callback.points


def test_step_checkpoint_refuses_bad_settings_and_reads_the_slurm_job(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="every_n_steps must be positive or null, got 0"):
        StepCheckpoint(str(tmp_path), every_n_steps=0)
    with pytest.raises(ValueError, match="expected signal names such as SIGTERM, got 'SIGNOPE'"):
        StepCheckpoint(str(tmp_path), signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="requeue_signals"):
        StepCheckpoint(str(tmp_path), signals=["SIGTERM"], requeue_signals=["SIGUSR1"])
    assert StepCheckpoint(str(tmp_path)).signals == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert slurm_job_id() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "120_3"


def test_logger_configs_build_the_history_keeping_loggers(tmp_path):
    pytest.importorskip("wandb")
    from hydra.utils import instantiate

    from varlib.configs import compose_config
    from varlib.loggers import WandbLogger

    cfg = compose_config("train", ["experiment=var_emoji", f"paths.output_dir={tmp_path}", "logger=[csv,tensorboard,wandb]",
                                   "logger.wandb.offline=true"])
    loggers = {name: instantiate(node) for name, node in cfg.logger.items()}
    assert isinstance(loggers["csv"], CSVLogger) and Path(loggers["csv"].log_dir) == tmp_path / "csv"
    assert isinstance(loggers["tensorboard"], TensorBoardLogger) and Path(loggers["tensorboard"].log_dir) == tmp_path / "tensorboard"
    assert isinstance(loggers["wandb"], WandbLogger) and Path(loggers["wandb"].save_dir) == tmp_path / "wandb"
    assert (tmp_path / "wandb" / "wandb_run_id").read_text().strip() == loggers["wandb"].version


class FakeLoopTrainer:
    """What StepCheckpoint uses of a Trainer, one process: saves are recorded, not written."""

    def __init__(self):
        self.global_step, self.is_global_zero, self.saved = 0, True, []
        self.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=100))

    def save_checkpoint(self, path, weights_only):
        self.saved.append((self.global_step, Path(path).name))


def test_step_checkpoint_saves_periodically_then_on_sigusr1_stops_and_requeues_the_slurm_job(tmp_path, monkeypatch):
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol_args'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    callback, trainer = StepCheckpoint(str(tmp_path), every_n_steps=3), FakeLoopTrainer()
    callback.on_train_start(trainer, None)
    try:
        for step in range(1, 8):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, None, None, step - 1)
        assert trainer.saved == [(3, "last.ckpt"), (6, "last.ckpt")] and callback.stopped_by is None
        assert signal.getsignal(signal.SIGUSR1) == callback._note  # installed for the run
        os.kill(os.getpid(), signal.SIGUSR1)  # noted, not acted on, until the step ends
        assert trainer.saved[-1][0] == 6 and not (tmp_path / "scontrol_args").exists()
        trainer.global_step = 8
        callback.on_train_batch_end(trainer, None, None, None, 7)
    finally:
        callback.on_train_end(trainer, None)
    assert trainer.saved[-1] == (8, "last.ckpt") and callback.stopped_by == "SIGUSR1"
    assert trainer.fit_loop.epoch_loop.max_steps == 8  # fit ends after this step, without a validation
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the previous handler is back
