"""LoRA fine-tuning from a pretrained file (another class count) under DDP and FSDP2 on 2 CPU processes:
SIGKILLed and resumed equals uninterrupted, and the export (and last checkpoint) open as plain VARs without peft."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.token_caches import tokenize_to_cache

import varlib
from varlib.models.transformer import VAR, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE

ROOT = Path(__file__).resolve().parents[1]
TWO_CPU_PROCESSES = ("trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random tokenizer, a 16-image train / 8-image val cache of 3 classes, a pretrained VAR of 5 classes."""
    tmp = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()
    varlib.save_tokenizer(vae, tmp / "tok.safetensors")
    varlib.save_var(VAR(vae, VARConfig(depth=2, num_classes=5, width=64, num_heads=2)), tmp / "pretrained.safetensors")
    images, labels = torch.rand(24, 3, 64, 64) * 2 - 1, torch.arange(24) % 3
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    tokenize_to_cache(vae, batches[:2], tmp / "cache", "train", num_classes=3)
    tokenize_to_cache(vae, batches[2:], tmp / "cache", "val", num_classes=3)
    return tmp


def train(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "experiment=var_finetune", f"paths.output_dir={tmp / out}", f"data.root={tmp / 'cache'}",
        f"model.tokenizer_path={tmp / 'tok.safetensors'}", f"model.init_from={tmp / 'pretrained.safetensors'}",
        "model.var.num_classes=3", "model.class_map={0: 4}", "model.lora={r: 4, alpha: 8, dropout: 0.1}",
        "model.ema_decay=0.9", "data.batch_size=4", "model.optim.lr=0.0625", "trainer.max_steps=12",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "logger=csv",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.log_every_n_steps=1",
        *TWO_CPU_PROCESSES, *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "tests")]))}
    return subprocess.run([sys.executable, "-m", "varlib.cli.train", *overrides], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_killed_and_resumed_equals_uninterrupted_and_exports_a_plain_file(tiny, strategy):
    reference = train(tiny, f"reference_{strategy}", f"trainer={strategy}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    log = reference.stdout + reference.stderr
    assert "init_from" in log and "null row moved to 3" in log, log[-3000:]
    resumed_dir = tiny / f"resumed_{strategy}"
    # the same command twice: killed once (helpers.callbacks.KillAtStep kills each rank once), then resumed
    command = (f"trainer={strategy}", "+callbacks.kill._target_=helpers.callbacks.KillAtStep", "+callbacks.kill.step=8")
    killed = train(tiny, resumed_dir.name, *command)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(tiny, resumed_dir.name, *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    want, got = step_losses(tiny / f"reference_{strategy}"), step_losses(resumed_dir)
    assert sorted(got) == list(range(12))  # the resumed run's log continues the killed one's: each step once
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=1e-6), step
    want_file, got_file = load_file(tiny / f"reference_{strategy}" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert want_file.keys() == got_file.keys()
    assert not any("lora" in k or "base_layer" in k for k in got_file)
    for key in want_file:
        torch.testing.assert_close(got_file[key], want_file[key], atol=1e-6, rtol=0, msg=key)
    # the adapters trained and were merged: the exported weights differ from the pretrained ones where LoRA sits
    pretrained = load_file(tiny / "pretrained.safetensors")
    assert not torch.equal(got_file["var.blocks.0.ffn.fc1.weight"], pretrained["var.blocks.0.ffn.fc1.weight"])
    assert torch.equal(got_file["var.blocks.0.attn.mat_qkv.weight"], pretrained["var.blocks.0.attn.mat_qkv.weight"])
    # the last checkpoint (LoRA layout, EMA) opens as the same plain VAR, without peft
    code = ("import sys; sys.modules['peft'] = None; import varlib, torch; "
            f"a = varlib.load({str(resumed_dir / 'checkpoints' / 'last.ckpt')!r}).state_dict(); "
            f"b = varlib.load({str(resumed_dir / 'model.safetensors')!r}).state_dict(); "
            "assert a.keys() == b.keys(); print(max(float((a[k].float() - b[k].float()).abs().max()) for k in a))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip()) < 1e-6
