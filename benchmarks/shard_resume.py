"""Resuming a WebDataset training stream mid-epoch: what it costs with webdataset's streaming pipeline and with
reading the shards by index (varlib's ``IndexedShardDataset``; webdataset's ``wids`` reader too when installed).

Writes ``--shards`` tar shards of ``--per-shard`` JPEG samples (``--side`` px), then measures on one thread:

* ``stream samples/s``: the streaming pipeline (``indexed=false``: shuffled shard order, shuffle buffer,
  decode + transform);
* ``stream resume s``: what a replay resume would cost at mid-epoch: the raw samples before that position read
  again through the shard order and shuffle buffer, without decoding (the only way to rebuild a shuffle buffer);
* ``index s``: listing every shard's samples (``IndexedShardDataset`` does it when the train loader is built);
* ``indexed samples/s``: the same decode + transform, the samples read in a global seeded permutation;
* ``indexed resume s``: a fresh indexed set (listing included) reading 64 samples from mid-epoch on;
* ``wids samples/s (n shards open)``: the same permutation through ``wids.ShardListDataset`` (when ``wids`` is
  installed), all shards kept open, then its default of 10.

    .venv/bin/python benchmarks/shard_resume.py --shards 32 --per-shard 256 --side 128
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from varlib.data.resumable import SeededIndex
from varlib.data.shards import CountingHandler, IndexedShardDataset, ShardSampleDecoder, shard_pipeline
from varlib.data.skipping import SkipCounter
from varlib.data.transforms import ImageTransform


def write_shards(root: Path, shards: int, per_shard: int, side: int) -> list[str]:
    """Smooth random JPEG images with labels 0..9, ``per_shard`` per tar file."""
    rng = np.random.default_rng(0)
    urls = []
    for shard in range(shards):
        path = root / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                buffer = io.BytesIO()
                coarse.resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=90)
                for extension, data in (("jpg", buffer.getvalue()), ("cls", str(index % 10).encode())):
                    info = tarfile.TarInfo(f"{shard:04d}_{index:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--side", type=int, default=128, help="stored image side (px)")
    parser.add_argument("--image-size", type=int, default=64, help="training resolution after the transform")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import wids  # webdataset's indexed reader, measured when installed
    except ImportError:
        wids = None
    decoder = ShardSampleDecoder(ImageTransform(args.image_size, train=True, hflip=True), num_classes=10)
    total = args.shards * args.per_shard
    figures: dict[str, float] = {"samples": total}
    with tempfile.TemporaryDirectory() as folder:
        urls = write_shards(Path(folder), args.shards, args.per_shard, args.side)
        figures["MB"] = round(sum(Path(u).stat().st_size for u in urls) / 1e6, 1)

        handler = CountingHandler(SkipCounter())
        stream = shard_pipeline(urls, decoder, handler, train=True, shuffle_buffer=args.shuffle_buffer)
        seconds, count = timed(lambda: sum(1 for _ in stream))
        figures["stream samples/s"] = round(count / seconds, 1)
        raw = shard_pipeline(urls, lambda sample: sample, handler, train=True, shuffle_buffer=args.shuffle_buffer)
        seconds, _ = timed(lambda: sum(1 for _, _ in zip(range(total // 2), raw)))
        figures["stream resume s"] = round(seconds, 3)

        seconds, _ = timed(lambda: IndexedShardDataset(urls, decoder, SkipCounter()))
        figures["index s"] = round(seconds, 3)
        order = np.random.default_rng(0).permutation(total)

        def read(rows) -> int:
            dataset = IndexedShardDataset(urls, decoder, SkipCounter())
            return sum(1 for row in rows if dataset[SeededIndex(int(row), int(row))] is not None)

        seconds, count = timed(lambda: read(order))
        figures["indexed samples/s"] = round(count / seconds, 1)
        seconds, _ = timed(lambda: read(order[total // 2:total // 2 + 64]))
        figures["indexed resume s"] = round(seconds, 3)
        if wids is not None:
            lengths = [wids.wids.compute_num_samples(url) for url in urls]
            shard_list = [{"url": url, "nsamples": n} for url, n in zip(urls, lengths)]

            def read_wids(lru_size: int) -> int:
                dataset = wids.ShardListDataset(shard_list, localname=str, lru_size=lru_size, transformations=[])
                for row in order:  # wids hands entries as file objects named by their extension with its dot
                    sample = dataset[int(row)]
                    decoder({key.lstrip("."): value.getvalue() if isinstance(value, io.BytesIO) else value
                             for key, value in sample.items()})
                return total

            for lru_size in (args.shards, 10):
                seconds, count = timed(lambda: read_wids(lru_size))
                figures[f"wids samples/s ({lru_size} shards open)"] = round(count / seconds, 1)
    print(json.dumps({"settings": vars(args), "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
