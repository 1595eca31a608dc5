"""Token caches at scale: memory-mapped reading, per-rank shares, resumable multi-process tokenising, crops."""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from varlib.data.base import units_of_range
from varlib.data.skipping import SkipCounter, collate_skipping_none
from varlib.data.token_cache import FORMAT, RankBlockSampler, TokenDataset, memmap_safetensors
from varlib.data.tokenizing import tokenize_split
from varlib.data.transforms import MultiCropTransform
from varlib.models.vqvae import MultiScaleVQVAE

PATCH_NUMS = (1, 2, 3, 4)


def write_cache(root, rows: int, length: int, shards: int) -> None:
    """A cache of ``rows`` random int16 rows of ``length`` tokens split over ``shards`` files."""
    root.mkdir(parents=True, exist_ok=True)
    names, generator = [], torch.Generator().manual_seed(0)
    for i, chunk in enumerate(torch.arange(rows).chunk(shards)):
        tokens = torch.randint(0, 4096, (len(chunk), length), dtype=torch.int16, generator=generator)
        tokens[:, 0] = chunk.to(torch.int16)  # row id, to check what was read
        save_file({"tokens": tokens, "labels": chunk % 1000}, str(root / f"train-{i:05d}.safetensors"))
        names.append(f"train-{i:05d}.safetensors")
    (root / "index.json").write_text(json.dumps({"format": FORMAT, "patch_nums": [1], "vocab_size": 4096,
                                                 "num_classes": 1000, "splits": {"train": names}}))


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_memory_mapped_cache_holds_only_the_rows_a_rank_reads(tmp_path):
    """96 MiB of tokens: opening costs the labels only; one rank of 4 maps its quarter (plus read-ahead), not the file."""
    rows, length = 36_000, 1400  # 2800 bytes per row (ImageNet 256px rows are 1360)
    write_cache(tmp_path, rows, length, shards=3)
    file_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert file_bytes > 96 * 2**20

    before = rss()
    dataset = TokenDataset(tmp_path, "train")
    opened = rss() - before
    assert opened < 0.03 * file_bytes, (opened, file_bytes)  # labels: 8 bytes per row

    sampler = RankBlockSampler(rows, block_size=1000, num_replicas=4, rank=1)
    read = []
    before = rss()
    for i in sampler:
        tokens, label = dataset[i]
        read.append(int(tokens[0]))
    grown = rss() - before
    assert sorted(read) == sorted(set(read)) and len(read) == len(sampler) == 9000
    # its share (25 %) of the pages plus the kernel's read-ahead around them (measured: about 40 %), not the file
    assert grown < 0.5 * file_bytes, (grown, file_bytes)
    assert int(dataset[123][0][0]) == 123 and int(dataset[123][1]) == 123


def test_rank_blocks_partition_the_rows_and_replay_by_epoch():
    shares = [list(RankBlockSampler(10_500, block_size=1000, num_replicas=4, rank=r, seed=3)) for r in range(4)]
    # 11 blocks (the last of 500) dealt to 4 ranks: 3, 3, 3, 2; the shortest share may be 1 + 0.5 blocks
    assert all(len(share) == 1500 for share in shares)
    seen = [i for share in shares for i in share]
    assert len(seen) == len(set(seen)) and all(0 <= i < 10_500 for i in seen)
    for share in shares:  # contiguous blocks: at most 3 distinct blocks per rank
        assert len({i // 1000 for i in share}) <= 3
    sampler = RankBlockSampler(10_500, block_size=1000, num_replicas=4, rank=0, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != shares[0]
    sampler.set_epoch(0)
    assert list(sampler) == shares[0]
    assert len(RankBlockSampler(10, block_size=1000, num_replicas=4, rank=3)) == 2  # blocks shrink to fit


class Images(Dataset):
    """24 random 32 px images as PIL-free tensors; index ``bad`` is unreadable (None, counted)."""

    def __init__(self, counter: SkipCounter, bad: int | None = None, crops: int = 1, interrupt_at: int | None = None):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(24, 3, 40, 40, generator=generator) * 2 - 1
        self.counter, self.bad, self.crops, self.interrupt_at = counter, bad, crops, interrupt_at

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i):
        if i == self.interrupt_at:
            raise KeyboardInterrupt("killed")
        if i == self.bad:
            self.counter.record(f"image {i}", "corrupt")
            return None
        image = self.images[i]
        if self.crops == 1:
            return image[:, 4:36, 4:36], i % 3
        offsets = torch.randint(0, 9, (self.crops, 2))
        return torch.stack([image[:, y:y + 32, x:x + 32] for y, x in offsets.tolist()]), i % 3


def run(vae, out, dataset, rank=0, world_size=1, **kwargs):
    units = units_of_range(len(dataset), 5, lambda r: DataLoader(torch.utils.data.Subset(dataset, r), batch_size=2,
                                                                 collate_fn=collate_skipping_none),
                           lambda: dataset.counter.value)
    return tokenize_split(vae, units, out, "train", 3, PATCH_NUMS, rank=rank, world_size=world_size, **kwargs)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, using_sa=False,
                           using_mid_sa=False, patch_nums=PATCH_NUMS).eval()


@pytest.mark.parametrize("crops", [1, 3])
def test_resumed_and_multi_process_tokenising_write_the_same_shards(vae, tmp_path, crops, capsys):
    whole = run(vae, tmp_path / "whole", Images(SkipCounter(), bad=7, crops=crops), with_flip=True, crops=crops)
    assert whole == {"written": 23, "skipped": 1, "resumed": 0}
    assert "img/s" in capsys.readouterr().err  # progress shows the rate (and the ETA: the total is known)
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert files == [f"train-{i:05d}.safetensors" for i in range(5)]
    index = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert index["splits"]["train"] == files and index["skipped"] == {"train": 1}

    # killed in the middle of shard 2 (image 12), then run again: shards 0 and 1 are kept, not redone
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(vae, killed, Images(SkipCounter(), bad=7, crops=crops, interrupt_at=12), with_flip=True, crops=crops)
    assert sorted(p.name for p in killed.iterdir()) == files[:2]  # no index, no partial file
    kept = {name: (killed / name).stat().st_mtime_ns for name in files[:2]}
    resumed = run(vae, killed, Images(SkipCounter(), bad=7, crops=crops), with_flip=True, crops=crops)
    assert resumed == {"written": 14, "skipped": 0, "resumed": 2}
    assert {name: (killed / name).stat().st_mtime_ns for name in files[:2]} == kept

    # two processes, each its share (units 0, 2, 4 and 1, 3); the second to finish writes the index
    shared = tmp_path / "shared"
    first = run(vae, shared, Images(SkipCounter(), bad=7, crops=crops), rank=0, world_size=2, with_flip=True,
                crops=crops)
    assert first["written"] == 14 and not (shared / "index.json").exists()
    run(vae, shared, Images(SkipCounter(), bad=7, crops=crops), rank=1, world_size=2, with_flip=True, crops=crops)
    for other in (killed, shared):
        for name in files:
            assert (other / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), (other, name)
        assert json.loads((other / "index.json").read_text())["skipped"] == {"train": 1}

    dataset = TokenDataset(shared, "train", use_flip=True, train=True)
    assert len(dataset) == 23 and dataset.crops == crops
    stored = memmap_safetensors(shared / files[0])["tokens"]
    assert stored.shape == ((5, 4 * 4 + 9 + 4 + 1) if crops == 1 else (5, crops, 30))
    if crops > 1:  # the crops differ, and a training sample is one of them
        assert not np.array_equal(stored[0, 0], stored[0, 1])
        torch.manual_seed(0)
        choices = {tuple(dataset[0][0].tolist()) for _ in range(40)}
        flips = memmap_safetensors(shared / files[0])["tokens_flip"][0]
        assert choices <= {tuple(map(int, row)) for row in (*stored[0], *flips)} and len(choices) > 1


def test_resuming_with_other_settings_is_refused(vae, tmp_path):
    run(vae, tmp_path, Images(SkipCounter()))
    with pytest.raises(ValueError, match="written by another tokenisation run"):
        run(vae, tmp_path, Images(SkipCounter()), with_flip=True)


def test_multi_crop_transform_draws_independent_official_crops():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    torch.manual_seed(0)
    crops = MultiCropTransform(32, 4)(image)
    assert crops.shape == (4, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    assert len({tuple(c.flatten()[:50].tolist()) for c in crops}) > 1
