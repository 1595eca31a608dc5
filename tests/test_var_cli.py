"""`varlib-train` for VAR end to end in subprocesses: SIGKILL mid-run then the same command resumes and
matches an uninterrupted run; DDP and FSDP2 with 2 CPU processes (gloo); invalid configurations fail
before training."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import varlib
from varlib.data.tokenizing import tokenize_to_cache
from varlib.models.vqvae import MultiScaleVQVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A tiny random tokenizer and a 16-image train / 8-image val token cache."""
    tmp = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()
    varlib.save_tokenizer(vae, tmp / "tok.safetensors")
    images, labels = torch.rand(24, 3, 64, 64) * 2 - 1, torch.arange(24) % 3
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    tokenize_to_cache(vae, batches[:2], tmp / "cache", "train", num_classes=3)
    tokenize_to_cache(vae, batches[2:], tmp / "cache", "val", num_classes=3)
    return tmp


def train(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "experiment=var_emoji", f"paths.output_dir={tmp / out}", f"data.root={tmp / 'cache'}",
        f"model.tokenizer_path={tmp / 'tok.safetensors'}", "data.batch_size=4", "model.var.depth=2",
        "model.var.num_classes=3", "model.var.width=64", "model.var.num_heads=2", "model.var.drop_path_rate=0.1",
        "model.var.cond_drop_rate=0.5", "model.var.init_adaln_gamma=1.0", "model.base_lr=0.5",
        "trainer.max_steps=12", "trainer.max_time=null", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "logger=csv", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.log_every_n_steps=1", *extra,
    ]
    # keep the caller's PYTHONPATH (a worktree's src/) ahead of the tests folder, which holds the kill callback
    paths = [os.environ.get("PYTHONPATH"), str(ROOT / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, "-m", "varlib.cli.train", *overrides], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_and_matches_uninterrupted_run(tiny_cache):
    reference = train(tiny_cache, "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = train(tiny_cache, "resumed", "+callbacks.kill._target_=helpers.callbacks.KillAtStep",
                   "+callbacks.kill.step=8")
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = torch.load(tiny_cache / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert not (tiny_cache / "resumed" / "model.safetensors").exists()

    resumed = train(tiny_cache, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr  # not a fresh (equally deterministic) run
    # Same batches (seeded by epoch), label-dropout/drop-path masks (seeded by step) and optimizer state.
    want_losses, got_losses = step_losses(tiny_cache / "reference"), step_losses(tiny_cache / "resumed")
    assert sorted(got_losses) == [8, 9, 10, 11]
    for step, loss in got_losses.items():
        assert loss == pytest.approx(want_losses[step], abs=1e-6), step
    want = load_file(tiny_cache / "reference" / "model.safetensors")
    got = load_file(tiny_cache / "resumed" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    reference_metrics = json.loads((tiny_cache / "reference" / "metrics.json").read_text())
    resumed_metrics = json.loads((tiny_cache / "resumed" / "metrics.json").read_text())
    assert resumed_metrics["val/loss_avg"] == pytest.approx(reference_metrics["val/loss_avg"], abs=1e-6)
    assert reference_metrics["val/loss_avg"] < 3.0  # it learned (log 32 = 3.47 at init)


@pytest.mark.parametrize("override,message", [
    ("model.var.depth=0", "depth must be >= 1"),
    ("model.var.patch_nums=[1,2,3,5]", "last patch number must equal"),
    ("model.var.num_classes=2", "data has 3 classes but the model only 2"),
    ("data.batch_size=0", "batch_size must be >= 1"),
])
def test_invalid_configuration_fails_before_training(tiny_cache, override, message):
    result = train(tiny_cache, "invalid", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tiny_cache / "invalid" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_two_process_training_exports_one_loadable_model(tiny_cache, trainer):
    out = f"dist_{trainer}"
    result = train(tiny_cache, out, f"trainer={trainer}", "trainer.devices=2", "trainer.accelerator=cpu",
                   "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.model_checkpoint=null")
    assert result.returncode == 0, result.stderr[-3000:]
    var = varlib.load(tiny_cache / out / "model.safetensors")
    assert isinstance(var, varlib.VAR) and var.depth == 2
    metrics = json.loads((tiny_cache / out / "metrics.json").read_text())
    assert 0 < metrics["val/loss_avg"] < 3.47 and 0 <= metrics["val/err_last"] <= 100
