"""A 2-process CPU training run on WebDataset shards that records what each rank trains on (run as a script).

    python shard_training.py SHARDS_GLOB RUN_DIR RECORD_FILE_PREFIX [KILL_AT_STEP]

Each training step appends ``{"step", "labels", "pixels"}`` (the batch's labels and the sum of its pixels) to
``RECORD_FILE_PREFIX-rank<r>.jsonl``. A checkpoint is saved every 5 steps in RUN_DIR, and a run finding
``RUN_DIR/last.ckpt`` resumes from it. With KILL_AT_STEP, each rank SIGKILLs itself right after the checkpoint of
that step.
"""

import json
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


def main() -> None:
    shards, run_dir, record_prefix = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    datamodule = WebDatasetDataModule(shards, num_classes=48, batch_size=2, num_workers=2, image_size=16, hflip=True,
                                      shuffle_seed=5)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, every_n_train_steps=5, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[saver] + ([KillAtStep(kill_at)] if kill_at is not None else []))
    last = Path(run_dir) / "last.ckpt"
    trainer.fit(BatchRecorder(record_prefix), datamodule=datamodule, ckpt_path=last if last.is_file() else None,
                weights_only=True)


if __name__ == "__main__":
    main()
