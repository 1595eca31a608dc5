"""A 2-process x 2-worker CPU training run on a streamed Parquet dataset through ``data=hf`` (half its rows hashed
into validation) that records what each rank trains on (run as a script).

    python hf_training.py PARQUET_GLOB RUN_DIR RECORD_FILE_PREFIX [KILL_AT_STEP]

Each training step appends ``{"step", "labels", "pixels"}`` to ``RECORD_FILE_PREFIX-rank<r>.jsonl`` (the records of
``helpers/shard_training.py``, whose run this mirrors: a checkpoint every 5 steps, a resume from ``RUN_DIR/last.ckpt``,
a SIGKILL of each rank after the checkpoint of KILL_AT_STEP).
"""

import sys
from pathlib import Path

import lightning as L
import torch

from helpers.callbacks import KillAtStep
from helpers.shard_training import BatchRecorder
from varlib.data import HFDataModule


def main() -> None:
    files, run_dir, record_prefix = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    datamodule = HFDataModule("parquet", data_files={"train": files}, val_split=None, val_fraction=0.5,
                              streaming=True, label_column="index", num_classes=200, rows_per_epoch=48,
                              shuffle_buffer=8, batch_size=2, num_workers=2, image_size=8, hflip=True, shuffle_seed=5,
                              cache_dir=str(Path(run_dir) / "datasets_cache"))
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, every_n_train_steps=5, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[saver] + ([KillAtStep(kill_at)] if kill_at is not None else []))
    last = Path(run_dir) / "last.ckpt"
    trainer.fit(BatchRecorder(record_prefix), datamodule=datamodule, ckpt_path=last if last.is_file() else None,
                weights_only=True)


if __name__ == "__main__":
    main()
