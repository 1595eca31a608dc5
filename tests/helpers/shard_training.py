"""A 2-process CPU training run on WebDataset shards that records what each rank trains on (run as a script).

    python shard_training.py SHARDS_GLOB RUN_DIR RECORD_FILE_PREFIX [KILL_AT_STEP]

Each training step appends ``{"step", "labels", "pixels"}`` (the batch's labels and the sum of its pixels) to
``RECORD_FILE_PREFIX-rank<r>.jsonl``. A checkpoint is saved every 5 steps in RUN_DIR, and a run finding
``RUN_DIR/last.ckpt`` resumes from it. With KILL_AT_STEP, each rank SIGKILLs itself right after the checkpoint of
that step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from helpers.callbacks import KillAtStep
from varlib.data import WebDatasetDataModule


class BatchRecorder(L.LightningModule):
    def __init__(self, record_prefix: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.record_prefix = record_prefix

    def training_step(self, batch, batch_idx):
        images, labels = batch
        record = {"step": self.global_step, "labels": labels.tolist(), "pixels": images.double().sum().item()}
        with open(f"{self.record_prefix}-rank{self.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        return (self.weight - images.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train_recording(datamodule: L.LightningDataModule, run_dir: str, record_prefix: str, kill_at: int | None) -> None:
    """The recorded 2-process DDP run of 20 steps on ``datamodule``: a checkpoint every 5 steps, a resume from
    ``RUN_DIR/last.ckpt`` when there is one, a SIGKILL of each rank after the checkpoint of ``kill_at``."""
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, every_n_train_steps=5, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[saver] + ([KillAtStep(kill_at)] if kill_at is not None else []))
    last = Path(run_dir) / "last.ckpt"
    trainer.fit(BatchRecorder(record_prefix), datamodule=datamodule, ckpt_path=last if last.is_file() else None,
                weights_only=True)


def read_records(prefix: Path, rank: int) -> list[dict]:
    """What rank ``rank`` of the run recording to ``prefix`` trained on, a record per step."""
    return [json.loads(line) for line in Path(f"{prefix}-rank{rank}.jsonl").read_text().splitlines()]


def assert_killed_run_resumes_exactly(script: Path, data: str, tmp_path: Path) -> list[int]:
    """Runs ``script DATA RUN_DIR RECORD_PREFIX [KILL_AT_STEP]`` (a :func:`train_recording` run) whole, then killed
    after the step-15 checkpoint (epoch 1, 3 of its 12 batches trained) and resumed by the same command; asserts the
    two segments trained on exactly what the whole run did, rank by rank. Returns the whole run's epoch-0 labels
    over both ranks."""
    env = {**os.environ, "PYTHONPATH": f"{script.parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}

    def train(run: str, record: str, *kill_at: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), data, str(tmp_path / run), str(tmp_path / record), *kill_at]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    whole = train("whole", "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = train("killed", "before", "15")
    assert killed.returncode != 0
    resumed = train("killed", "after")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        expected = read_records(tmp_path / "whole", rank)
        assert [r["step"] for r in expected] == list(range(20))
        before, after = read_records(tmp_path / "before", rank), read_records(tmp_path / "after", rank)
        assert [r["step"] for r in before] == list(range(15)) and [r["step"] for r in after] == list(range(15, 20))
        assert before + after == expected  # the same labels and pixels (crops and flips) in the same order
    return [label for rank in (0, 1) for r in read_records(tmp_path / "whole", rank)[:12] for label in r["labels"]]


def main() -> None:
    shards, run_dir, record_prefix = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    datamodule = WebDatasetDataModule(shards, num_classes=48, batch_size=2, num_workers=2, image_size=16, hflip=True,
                                      shuffle_seed=5)
    train_recording(datamodule, run_dir, record_prefix, kill_at)


if __name__ == "__main__":
    main()
