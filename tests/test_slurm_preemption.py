"""SLURM preemption without SLURM: the sbatch script that hydra/launcher=slurm (submitit) generates asks for a signal
that callbacks.step_checkpoint handles, saving at a step boundary and requeueing; the stop decision reads no device
tensor (a host-side all-reduce instead of the strategy's)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from varlib.training.preemption import StepCheckpoint


def submitit_launcher_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


class LoopTrainer:
    """What StepCheckpoint uses of a Trainer, one process: saves are recorded, not written; the strategy's reduce
    (which reads a device tensor on GPUs: a host-device sync) must not be called."""

    def __init__(self):
        self.global_step, self.is_global_zero, self.saved = 0, True, []
        self.strategy = SimpleNamespace(reduce_boolean_decision=self.device_sync)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=100))

    def device_sync(self, decision, all):
        raise AssertionError("the stop decision went through the strategy's reduce: a host-device sync every step")

    def save_checkpoint(self, path, weights_only):
        self.saved.append((self.global_step, Path(path).name))


def fake_command(folder: Path, name: str) -> Path:
    """An executable that records its arguments in <folder>/<name>_args."""
    path = folder / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\necho \"$@\" > {folder / (name + '_args')}\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(not submitit_launcher_installed(),
                    reason="hydra-submitit-launcher (the 'cluster' extra) is not installed")
def test_the_slurm_script_asks_for_a_signal_that_step_checkpoint_saves_on_and_requeues(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    with initialize_config_module("varlib.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=var_d16_imagenet256_2x8", "hydra/launcher=slurm",
                                          f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    for name in ("srun", "scontrol"):  # submitit looks for srun; StepCheckpoint requeues with scontrol
        fake_command(tmp_path, name)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)

    class Submitted(Exception):
        pass

    def write_script_instead_of_submitting(executor, *args, **kwargs):
        (tmp_path / "job.sh").write_text(executor._executor._make_submission_file_text("COMMAND", "uid"))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", write_script_instead_of_submitting)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    launcher = SlurmLauncher(**params)
    launcher.config = cfg
    with pytest.raises(Submitted):  # SlurmLauncher.launch itself builds the executor from the config
        launcher.launch([["experiment=var_d16_imagenet256_2x8"]], initial_job_idx=0)
    script = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=8" in script
    asked = re.search(r"^#SBATCH --signal=(\w+)@(\d+)$", script, re.MULTILINE)
    assert asked is not None, script
    assert int(asked.group(2)) == cfg.hydra.launcher.signal_delay_s
    sent = f"SIG{asked.group(1)}"

    callback: StepCheckpoint = instantiate(cfg.callbacks.step_checkpoint)
    handled = {s.name for s in callback.signals}
    assert {sent, "SIGTERM"} <= handled and sent in {s.name for s in callback.requeue_signals}
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    trainer = LoopTrainer()
    callback.on_train_start(trainer, None)  # replaces submitit's handler of the same signal (installed at job start)
    try:
        assert {signal.getsignal(s) for s in callback.signals} == {callback._note}
        trainer.global_step = 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
        os.kill(os.getpid(), signal.Signals[sent])  # noted, acted on at the end of the step
        assert trainer.saved == [] and not (tmp_path / "scontrol_args").exists()
        trainer.global_step = 2
        callback.on_train_batch_end(trainer, None, None, None, 1)
    finally:
        callback.on_train_end(trainer, None)
    assert trainer.saved == [(2, "last.ckpt")] and callback.stopped_by == sent
    assert trainer.fit_loop.epoch_loop.max_steps == 2
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"]


def test_step_checkpoint_decides_on_host_flags_without_the_strategys_device_reduce(tmp_path):
    callback, trainer = StepCheckpoint(str(tmp_path), every_n_steps=2, every_n_minutes=60), LoopTrainer()
    callback.on_train_start(trainer, None)
    try:
        for step in range(1, 6):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, None, None, step - 1)
    finally:
        callback.on_train_end(trainer, None)
    assert trainer.saved == [(2, "last.ckpt"), (4, "last.ckpt")] and callback.stopped_by is None
