"""`python -m varlib.cli.train`: composes the Hydra config, trains, resumes, exports, sweeps, runs DDP on CPU.

Each test starts the CLI in a subprocess whose working directory is a temporary folder, so the deterministic
output directories (outputs/<task_name>, multirun/<task_name>/<n>) land there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    result = train(tmp_path, "--multirun", *QUICK, "model.optim.lr=0.001,0.002")
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.loss.lpips_weight=-1", "loss.lpips_weight must be >= 0, got -1"),
        ("data.image_size=48", "data.image_size=48 does not match the tokenizer: expected 64"),
        ("export_name=model.pt", "export_name must end with '.safetensors'"),
    ],
)
@pytest.mark.slow  # a subprocess each
def test_cli_bad_config_fails_before_training(tmp_path, override, message):
    result = train(tmp_path, *QUICK, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "outputs" / "tokenizer_emoji" / "checkpoints").exists()
