"""Resuming a WebDataset training stream mid-epoch: what it costs with webdataset's streaming pipeline and with
webdataset's indexed reader ``wids``, on local shards.

Writes ``--shards`` tar shards of ``--per-shard`` JPEG samples (``--side`` px), then measures on one thread:

* ``stream samples/s``: the streaming pipeline varlib had (shuffled shard order, shuffle buffer, decode + transform);
* ``stream resume s``: what a replay resume costs at mid-epoch: the raw samples before that position read again
  through the shard order and shuffle buffer, without decoding (the only way to rebuild a shuffle buffer's state);
* ``index s``: listing every shard's samples once (wids' ``IndexedTarSamples``), the cost of a random-access set;
* ``indexed samples/s``: the same decode + transform reading the samples in a global seeded permutation through
  ``wids.ShardListDataset`` (every shard kept open; ``indexed samples/s lru10``: its default of 10 open shards);
* ``indexed resume s``: a fresh indexed set reading its first batch at mid-epoch (the sampler skips the rest).

    .venv/bin/python benchmarks/shard_resume.py --shards 16 --per-shard 256 --side 128
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

from varlib.data.shards import CountingHandler, ShardSampleDecoder, shard_pipeline
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
    import wids  # the optional reader measured against the stream

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

        seconds, lengths = timed(lambda: [wids.wids.compute_num_samples(u) for u in urls])
        figures["index s"] = round(seconds, 3)
        shard_list = [{"url": u, "nsamples": n} for u, n in zip(urls, lengths)]

        def indexed(lru_size: int):
            return wids.ShardListDataset(shard_list, localname=lambda url: url, lru_size=lru_size, transformations=[])

        def read(dataset, rows) -> int:
            # wids names entries by their extension with its dot and hands them as file objects
            for row in rows:
                sample = dataset[int(row)]
                decoder({key.lstrip("."): value.getvalue() if isinstance(value, io.BytesIO) else value
                         for key, value in sample.items()})
            return len(rows)

        order = np.random.default_rng(0).permutation(total)
        for lru_size, name in ((args.shards, "indexed samples/s"), (10, "indexed samples/s lru10")):
            seconds, count = timed(lambda: read(indexed(lru_size), order))
            figures[name] = round(count / seconds, 1)
        seconds, _ = timed(lambda: read(indexed(args.shards), order[total // 2:total // 2 + 64]))
        figures["indexed resume s (first 64 samples)"] = round(seconds, 3)
    print(json.dumps({"settings": vars(args), "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
