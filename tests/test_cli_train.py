"""`python -m varlib.cli.train`: composes the Hydra config, trains, resumes, exports, sweeps, runs DDP on CPU.

Each test runs the CLI in a temporary working directory, so the deterministic output directories
(outputs/<task_name>, multirun/<task_name>/<n>) land there: in a subprocess where the test needs one (the command
as a user starts it, two ranks, a kill), else through its Hydra entry point in the test's process
(:mod:`helpers.commands`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import assert_usage_error
from helpers.commands import run_in_process

import varlib

# Two training steps of the emoji quickstart on small batches, validating one batch.
QUICK = [
    "experiment=tokenizer_emoji",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.batch_size=4",
    "logger=csv",
]


def train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "varlib.cli.train", *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def train_here(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """:func:`train`'s run in this process."""
    return run_in_process([sys.executable, "-m", "varlib.cli.train", *overrides], cwd)


def check_finished_run(output_dir: Path, steps: int) -> dict[str, float]:
    """The run in output_dir exported a loadable tokenizer, wrote its metrics and a last.ckpt at ``steps``."""
    vae = varlib.load(output_dir / "model.safetensors")
    assert isinstance(vae, varlib.MultiScaleVQVAE) and vae.image_size == 64
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert {"val/psnr", "val/ssim", "val/codebook_usage"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == steps
    return metrics


@pytest.mark.slow
def test_cli_trains_exports_and_resumes_from_the_same_command(tmp_path):
    first = train(tmp_path, *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    output_dir = tmp_path / "outputs" / "tokenizer_emoji"
    check_finished_run(output_dir, steps=2)
    assert "resuming from" not in first.stderr + first.stdout

    again = train(tmp_path, *QUICK, "trainer.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {output_dir / 'checkpoints' / 'last.ckpt'}" in again.stderr + again.stdout
    check_finished_run(output_dir, steps=4)


@pytest.mark.slow
def test_cli_multirun_sweeps_two_learning_rates(tmp_path):
    result = train_here(tmp_path, "--multirun", *QUICK, "model.optim.lr=0.001,0.002")
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in enumerate((0.001, 0.002)):
        output_dir = tmp_path / "multirun" / "tokenizer_emoji" / str(job)
        check_finished_run(output_dir, steps=2)
        hparams = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
        assert hparams["optim"]["lr"] == lr


@pytest.mark.slow
def test_cli_ddp_with_two_cpu_processes_exports_once(tmp_path):
    result = train(tmp_path, *QUICK, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                   "trainer.strategy.broadcast_buffers=true")  # the quantizer's code-usage buffers
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = tmp_path / "outputs" / "tokenizer_emoji"
    check_finished_run(output_dir, steps=2)
    logs = list(output_dir.glob("*.log"))
    assert len(logs) == 2  # one Hydra job log per process
    assert sum(log.read_text().count("exported ") for log in logs) == 1


# A tiny tokenizer with EMA and a GAN from step 2 on 2 CPU processes: 2 images per rank per batch, one optimiser
# step per batch before the GAN starts and two after (steps 1, 2, 4, 6, ...), validating and saving every 2 batches.
TOKENIZER_DDP = [
    "experiment=tokenizer_emoji", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
    "trainer.precision=32-true", "trainer.strategy.find_unused_parameters=true",
    "trainer.strategy.broadcast_buffers=true", "trainer.max_steps=12", "trainer.max_time=null",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "logger=csv",
    "data.batch_size=2", "data.hflip=true", "model.vae.ch=16", "model.vae.vocab_size=64", "model.vae.z_channels=8",
    "model.vae.ch_mult=[1,1,1,2]", "model.vae.patch_nums=[1,2,4,8]", "model.ema_decay=0.9",
    "model.loss.disc_weight=0.5", "model.loss.disc_start_step=2", "model.discriminator.base_channels=8",
    "model.discriminator.n_layers=2", "model.dead_code_restart_every=3", "model.optim.warmup_steps=2",
    "model.optim.decay_by_time=false", "cpu_threads=1",
]


def train_with_helpers(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``train`` with tests/ importable, for the helper callbacks."""
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), tests_dir]))}
    command = [sys.executable, "-m", "varlib.cli.train", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def logged(run_dir: Path, name: str) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row[name]) for row in rows if row.get(name)}


@pytest.mark.slow
def test_tokenizer_ddp_sigkill_mid_epoch_in_the_gan_phase_resumes_like_an_uninterrupted_run(tmp_path):
    reference = train_with_helpers(tmp_path, *TOKENIZER_DDP, f"paths.output_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    resumed_dir = tmp_path / "resumed"
    # the same command twice: killed after batch 4 (the GAN started at batch 3), then resumed
    run = (*TOKENIZER_DDP, f"paths.output_dir={resumed_dir}", "+callbacks.kill._target_=helpers.callbacks.KillAtStep",
           "+callbacks.kill.step=6")
    killed = train_with_helpers(tmp_path, *run)
    assert killed.returncode != 0 and not (resumed_dir / "model.safetensors").exists()
    last = resumed_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    # mid-epoch: the train loader's position (4 batches of epoch 0) travels in the checkpoint
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 4}]

    resumed = train_with_helpers(tmp_path, *run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    want_rec, got_rec = logged(tmp_path / "reference", "train/rec"), logged(resumed_dir, "train/rec")
    assert [step for step in got_rec if step >= 6] and logged(resumed_dir, "train/disc")
    for step, value in got_rec.items():
        assert value == pytest.approx(want_rec[step], abs=1e-6), step
    want, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:  # the EMA weights
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    want_state = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    got_state = torch.load(last, weights_only=True)
    assert got_state["global_step"] == want_state["global_step"] == 12
    # the discriminator, the online autoencoder and the EMA's averages beside it (varlib.training.ema)
    trained = {prefix: [key for key in want_state["state_dict"] if key.startswith(prefix)]
               for prefix in ("discriminator.", "vae.", "ema.params.")}
    assert all(trained.values()) and want_state["state_dict"].keys() == got_state["state_dict"].keys()
    for key in [key for keys in trained.values() for key in keys]:
        torch.testing.assert_close(got_state["state_dict"][key], want_state["state_dict"][key], atol=1e-6, rtol=0,
                                   msg=key)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.loss.lpips_weight=-1", "loss.lpips_weight must be >= 0, got -1"),
        ("data.image_size=48", "data.image_size=48 does not match the tokenizer: expected 64"),
        ("export_name=model.pt", "export_name must end with '.safetensors'"),
    ],
)
def test_cli_bad_config_fails_before_training(tmp_path, override, message):
    result = train_here(tmp_path, *QUICK, override)
    assert_usage_error(result, message, tmp_path / "outputs" / "tokenizer_emoji")
