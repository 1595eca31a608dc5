"""Tiny Hugging Face datasets on disk for the ``data=hf`` tests: Parquet files and an image folder of distinct PNGs,
labelled by a ClassLabel and captioned. Nothing is downloaded."""

import io
import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

CLASS_NAMES = ["cat", "dog"]


def png(index: int, size: int = 12) -> bytes:
    """A distinct random size x size PNG for each index."""
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "PNG")
    return data.getvalue()


def caption(index: int) -> str:
    return f"photo {index} of a {CLASS_NAMES[index % 2]}"


def rows(indices: range) -> list[dict]:
    """Row i: image ``png(i)``, label i % 2, caption ``caption(i)``; sorted by class, then index (a folder's order)."""
    ordered = sorted(indices, key=lambda i: (i % 2, i))
    return [{"image": {"bytes": png(i), "path": None}, "label": i % 2, "caption": caption(i)} for i in ordered]


FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES),
                              "caption": datasets.Value("string")})


def write_parquet(folder: Path, split: str, table_rows: list[dict], files: int) -> None:
    """``folder/<split>-0000k.parquet``: ``table_rows`` in order, cut into ``files`` equal files."""
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(table_rows, features=FEATURES)
    for index in range(files):
        table.shard(files, index, contiguous=True).to_parquet(str(folder / f"{split}-{index:05d}.parquet"))


def write_image_folder(root: Path, split_indices: dict[str, range]) -> None:
    """``root/<split>/<class>/<index>.png`` with varlib's ``captions.jsonl`` beside each split (the imagefolder builder
    labels by folder and reads no captions: its own ``metadata.jsonl`` would replace the folder labels)."""
    for split, indices in split_indices.items():
        lines = []
        for i in sorted(indices, key=lambda i: (i % 2, i)):
            file = f"{CLASS_NAMES[i % 2]}/{i:03d}.png"
            (root / split / file).parent.mkdir(parents=True, exist_ok=True)
            (root / split / file).write_bytes(png(i))
            lines.append(json.dumps({"file": file, "caption": caption(i)}))
        (root / split / "captions.jsonl").write_text("\n".join(lines) + "\n")
