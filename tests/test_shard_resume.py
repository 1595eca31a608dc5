"""WebDataset shards read by index: every sample once per epoch, bad data counted, and a run killed mid-epoch on
2 processes x 2 workers resumes with exactly the samples an uninterrupted run trains on."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.shard_training import assert_killed_run_resumes_exactly
from varlib.data import WebDatasetDataModule
from varlib.data.resumable import SeededIndex
from varlib.data.shards import IndexedShardDataset, ShardSampleDecoder
from varlib.data.skipping import SkipCounter
from varlib.data.transforms import ImageTransform

TESTS = Path(__file__).parent


def write_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """Shards of distinct 20x24 PNGs; sample i (over all shards) has label i."""
    paths = []
    for shard in range(shards):
        path = root / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(index))
                png = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(png, "PNG")
                for name, data in ((f"{index:05d}.png", png.getvalue()), (f"{index:05d}.cls", str(index).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def decoder(num_classes: int) -> ShardSampleDecoder:
    return ShardSampleDecoder(ImageTransform(16, train=True, hflip=True), num_classes)


def test_indexed_rows_are_the_samples_in_shard_order_with_seeded_augmentation(tmp_path):
    paths = write_shards(tmp_path, 3, 4)
    dataset = IndexedShardDataset(paths, decoder(12), SkipCounter())
    assert len(dataset) == 12
    assert [int(dataset[i][1]) for i in range(12)] == list(range(12))
    for row in (0, 5, 11):  # the augmentation is drawn from the index's seed: the same image every time
        first, again = dataset[SeededIndex(row, 7)][0], dataset[SeededIndex(row, 7)][0]
        assert first.shape == (3, 16, 16) and torch.equal(first, again)
    with pytest.raises(IndexError, match=r"row 12 outside \[0, 12\)"):
        dataset[12]


def test_indexed_shards_skip_and_count_bad_samples_and_unreadable_shards(tmp_path):
    paths = write_shards(tmp_path, 2, 3)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in (("a.png", b"not a png"), ("a.cls", b"0"), ("b.png", b"x"), ("b.cls", b"99")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "empty.tar").write_bytes(b"")
    counter = SkipCounter()
    dataset = IndexedShardDataset([*paths, str(tmp_path / "empty.tar"), str(tmp_path / "bad.tar")], decoder(6),
                                  counter)
    assert counter.value == 1  # the empty file is no tar: counted, left out
    assert len(dataset) == 8
    assert [dataset[i] is None for i in range(8)] == [False] * 6 + [True, True]
    assert counter.value == 3  # the undecodable image and the label outside [0, 6)


def test_indexed_train_loader_reads_each_sample_once_per_epoch_in_a_seeded_order(tmp_path):
    write_shards(tmp_path, 3, 4)

    def epoch_labels(shuffle_seed: int) -> list[int]:
        datamodule = WebDatasetDataModule(str(tmp_path / "*.tar"), num_classes=12, batch_size=2, num_workers=0,
                                          image_size=16, shuffle_seed=shuffle_seed)
        return [label for _, batch in datamodule.train_dataloader() for label in batch.tolist()]

    first = epoch_labels(0)
    assert sorted(first) == list(range(12)) and first != list(range(12))
    assert epoch_labels(0) == first and epoch_labels(1) != first


@pytest.mark.slow  # three 2-process training runs
def test_a_two_process_two_worker_run_killed_mid_epoch_resumes_with_the_rest_of_the_stream(tmp_path):
    write_shards(tmp_path, 4, 12)  # 48 samples: 24 rows and 12 batches of 2 per rank and epoch
    epoch_one = assert_killed_run_resumes_exactly(TESTS / "helpers" / "shard_training.py", str(tmp_path / "*.tar"),
                                                  tmp_path)
    assert sorted(epoch_one) == list(range(48))  # an epoch: every sample once over both ranks
