"""A 2-process x 2-worker CPU training run on a streamed Parquet dataset through ``data=hf`` (half its rows hashed
into validation) that records what each rank trains on (run as a script).

    python hf_training.py PARQUET_GLOB RUN_DIR RECORD_FILE_PREFIX [KILL_AT_STEP]

Each training step appends ``{"step", "labels", "pixels"}`` to ``RECORD_FILE_PREFIX-rank<r>.jsonl`` (the records of
``helpers/shard_training.py``, whose run this mirrors: a checkpoint every 5 steps, a resume from ``RUN_DIR/last.ckpt``,
a SIGKILL of each rank after the checkpoint of KILL_AT_STEP).
"""

import sys
from pathlib import Path

import torch

from helpers.shard_training import train_recording
from varlib.data import HFDataModule


def main() -> None:
    files, run_dir, record_prefix = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    datamodule = HFDataModule("parquet", data_files={"train": files}, val_split=None, val_fraction=0.5,
                              streaming=True, label_column="index", num_classes=200, rows_per_epoch=48,
                              shuffle_buffer=8, batch_size=2, num_workers=2, image_size=8, hflip=True, shuffle_seed=5,
                              cache_dir=str(Path(run_dir) / "datasets_cache"))
    train_recording(datamodule, run_dir, record_prefix, kill_at)


if __name__ == "__main__":
    main()
