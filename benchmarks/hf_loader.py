"""Images/s of ``data=hf``'s training loaders against the image-folder loader on the same images.

Writes ``--images`` JPEGs (``--side`` px, 10 classes) once as an image folder and once as ``--files`` Parquet files
(the same bytes, in the same order), then measures on one thread, in the main process (``num_workers=0``), each loader
handing out one epoch of ``--batch-size`` batches decoded and transformed to ``--image-size`` px:

* ``folder``: ``ImageFolderDataModule`` (``data=imagefolder``), a seeded shuffle by index;
* ``hf streamed``: ``HFDataModule(streaming=True)`` (``data=hf``), the Parquet stream shuffled by ``datasets``
  (shard order and a 1000-row buffer);
* ``hf arrow``: ``HFDataModule(streaming=False)``, the Arrow cache read by index like the folder;
* ``hf streamed resume``: seconds from loading a checkpoint position half-way through the epoch to the first batch
  (the rows before it read again without decoding).

The loaders alternate ``--repeats`` times (the machine may be shared): min and median per loader, and the median
ratio to the folder.

    .venv/bin/python benchmarks/hf_loader.py --images 2048 --side 128 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from varlib.data import HFDataModule, ImageFolderDataModule


def write_images(root: Path, images: int, side: int, files: int) -> None:
    """``root/folder/train/<class>/<i>.jpg`` and ``root/parquet/train-<k>.parquet`` of the same smooth random JPEGs,
    in the folder's order (class, then name)."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=90)
        label = index % 10
        path = root / "folder" / "train" / f"class{label}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "label": label, "order": (label, path.name)})
    rows.sort(key=lambda row: row.pop("order"))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class{i}" for i in range(10)])})
    table = datasets.Dataset.from_list(rows, features=features)
    for index in range(files):
        table.shard(files, index, contiguous=True).to_parquet(str(root / "parquet" / f"train-{index:05d}.parquet"))


def images_per_second(loader) -> float:
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--side", type=int, default=128, help="stored image side (px)")
    parser.add_argument("--image-size", type=int, default=64, help="training resolution after the transform")
    parser.add_argument("--files", type=int, default=8, help="Parquet files")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_images(root, args.images, args.side, args.files)
        settings = dict(batch_size=args.batch_size, num_workers=0, image_size=args.image_size, hflip=True)
        hf = dict(path="parquet", data_files={"train": str(root / "parquet" / "*.parquet")}, val_split="train",
                  rows_per_epoch=args.images, cache_dir=str(root / "cache"), **settings)
        folder_data = dict(root=str(root / "folder"), val_dir="train", **settings)
        loaders = {
            "folder": lambda: ImageFolderDataModule(**folder_data).train_dataloader(),
            "hf streamed": lambda: HFDataModule(streaming=True, **hf).train_dataloader(),
            "hf arrow": lambda: HFDataModule(streaming=False, **hf).train_dataloader(),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        resume_s: list[float] = []
        for _ in range(args.repeats):
            for name, make in loaders.items():
                rates[name].append(images_per_second(make()))
            loader = loaders["hf streamed"]()
            half = len(loader) // 2
            start = time.perf_counter()
            loader.load_state_dict({"epoch": 0, "batches": half,
                                    "ranks": [{"rows_read": [half * args.batch_size], "next_worker": 0}]})
            next(iter(loader))
            resume_s.append(time.perf_counter() - start)
    folder_median = statistics.median(rates["folder"])
    figures = {name: {"images/s min": round(min(values), 1), "images/s median": round(statistics.median(values), 1),
                      "median / folder": round(statistics.median(values) / folder_median, 3)}
               for name, values in rates.items()}
    figures["hf streamed resume at half an epoch, s"] = {"min": round(min(resume_s), 3),
                                                         "median": round(statistics.median(resume_s), 3)}
    print(json.dumps({"settings": vars(args), "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
