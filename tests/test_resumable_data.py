"""Resumable training data: seeded order and augmentation, disjoint rank shares, and a Lightning run stopped
mid-epoch that resumes with exactly the batches an uninterrupted run trains on."""

from __future__ import annotations

import pickle
import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from varlib.data.base import ImageDataModule
from varlib.data.emoji import CachedImageDataset
from varlib.data.folder import ImageFolderDataModule
from varlib.data.resumable import ClassBalancedSampler, ResumableLoader, ResumableSampler, SeededIndex, sample_generator
from varlib.data.transforms import ImageTransform


def test_sampler_deals_disjoint_equal_shares_in_an_order_fixed_by_seed_and_epoch():
    shares = [list(ResumableSampler(103, num_replicas=4, rank=r, seed=5)) for r in range(4)]
    assert all(len(share) == 25 for share in shares)  # 103 // 4; the 3 rows that do not divide are left out
    rows = [int(i) for share in shares for i in share]
    assert len(set(rows)) == 100 and all(0 <= i < 103 for i in rows)
    again = ResumableSampler(103, num_replicas=4, rank=1, seed=5)
    assert list(again) == shares[1] and [i.seed for i in again] == [i.seed for i in shares[1]]
    again.set_epoch(1)
    assert list(again) != shares[1]
    assert list(ResumableSampler(103, num_replicas=4, rank=1, seed=6)) != shares[1]


def test_augmentation_seed_depends_on_seed_epoch_and_row_not_on_the_rank():
    one = {int(i): i.seed for i in ResumableSampler(40, num_replicas=1, rank=0, seed=0)}
    two = {int(i): i.seed for r in range(2) for i in ResumableSampler(40, num_replicas=2, rank=r, seed=0)}
    assert one == two and len(set(one.values())) == 40
    later = ResumableSampler(40, num_replicas=1, rank=0, seed=0)
    later.set_epoch(1)
    assert all(one[int(i)] != i.seed for i in later)


def test_resume_skips_the_rows_already_trained_once_and_only_in_its_epoch():
    sampler = ResumableSampler(20, num_replicas=2, rank=0, seed=1)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    sampler.resume(3, 4)
    assert sampler.rows_to_skip() == 4 and list(sampler) == epoch3[4:]
    assert list(sampler) == epoch3  # the next pass is whole again
    sampler.resume(3, 10)  # resumed at the very end of epoch 3: the next epoch is whole
    sampler.set_epoch(4)
    assert sampler.rows_to_skip() == 0 and len(list(sampler)) == 10
    with pytest.raises(ValueError, match="cannot resume after 11 rows of an epoch of 10 rows per rank"):
        sampler.resume(3, 11)


def test_seeded_index_survives_pickling_and_replays_a_random_crop_and_flip():
    index = pickle.loads(pickle.dumps(SeededIndex(7, seed=1234)))  # as DataLoader workers receive it
    assert index == 7 and index.seed == 1234 and sample_generator(7) is None
    transform = ImageTransform(32, train=True, hflip=True)
    pil = _to_pil(_noise_image(0))
    first, again = transform(pil, sample_generator(index)), transform(pil, sample_generator(index))
    assert torch.equal(first, again)
    others = {transform(pil, sample_generator(SeededIndex(7, seed=s))).sum().item() for s in range(8)}
    assert len(others) > 1


def test_loader_state_is_the_epoch_and_the_batches_handed_out():
    sampler = ResumableSampler(12, num_replicas=1, rank=0, seed=0)
    loader = ResumableLoader(list(range(12)), 3, sampler)
    assert len(loader) == 4
    sampler.set_epoch(2)
    batches = iter(loader)
    first = [next(batches).tolist() for _ in range(2)]
    assert loader.state_dict() == {"epoch": 2, "batches": 2}
    resumed = ResumableLoader(list(range(12)), 3, ResumableSampler(12, num_replicas=1, rank=0, seed=0))
    resumed.load_state_dict(loader.state_dict())
    rest = [batch.tolist() for batch in resumed]
    assert first + rest == [batch.tolist() for batch in loader]
    assert resumed.state_dict() == {"epoch": 2, "batches": 4}
    with pytest.raises(ValueError, match="keys epoch and batches"):
        resumed.load_state_dict({"epoch": 2})
    with pytest.raises(TypeError, match="needs a ResumableSampler"):
        ResumableLoader(list(range(12)), 3, torch.utils.data.SequentialSampler(range(12)))


@pytest.mark.parametrize("balance,expected_shares", [(0.0, [0.6, 0.3, 0.1]), (1.0, [1 / 3] * 3), (0.5, None)])
def test_class_balanced_rows_follow_the_balance_and_replay_by_epoch(balance, expected_shares):
    labels_N = torch.tensor([0] * 6000 + [1] * 3000 + [2] * 1000)
    samplers = [ClassBalancedSampler(labels_N, balance, num_replicas=2, rank=r, seed=3) for r in range(2)]
    rows = [list(sampler) for sampler in samplers]
    assert [len(r) for r in rows] == [5000, 5000]
    shares = torch.bincount(labels_N[torch.tensor(rows[0] + rows[1])], minlength=3).double() / 10_000
    if expected_shares is None:  # count ** -0.5: shares proportional to sqrt(count)
        expected_shares = [c ** 0.5 / sum(n ** 0.5 for n in (6000, 3000, 1000)) for c in (6000, 3000, 1000)]
    torch.testing.assert_close(shares, torch.tensor(expected_shares, dtype=torch.float64), atol=0.015, rtol=0)
    assert rows[0] == list(ClassBalancedSampler(labels_N, balance, num_replicas=2, rank=0, seed=3))
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != rows[0]
    with pytest.raises(ValueError, match=r"class_balance must be a number in \[0, 1\], got 2"):
        ClassBalancedSampler(labels_N, 2)


# -- a Lightning run stopped mid-epoch -------------------------------------------------------------------------


def _noise_image(seed: int) -> torch.Tensor:
    return torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _to_pil(image_CHW: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image_CHW.add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy())


class NoiseImages(ImageDataModule):
    """10 noise pictures (40 px) cropped and flipped at random to 32 px: 3 batches of 3 per epoch. Shuffled, each
    its own class; with ``class_balance``, 3 classes of 7, 2 and 1 pictures drawn class-balanced."""

    def __init__(self, class_balance: float = 0.0):
        super().__init__(batch_size=3, num_workers=0, image_size=32, hflip=True, shuffle_seed=2,
                         class_balance=class_balance)
        images_NHWC = torch.randint(0, 256, (10, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        labels_N = torch.tensor([0] * 7 + [1] * 2 + [2]) if class_balance else torch.arange(10)
        self.train_set = CachedImageDataset(images_NHWC, labels_N, list(range(10)),
                                            ImageTransform(32, train=True, hflip=True))

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_set, train=True)


class BatchRecorder(L.LightningModule):
    """Records each training batch (images, labels); one SGD step on a single weight per batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((images.clone(), labels.clone()))
        return (self.weight - images.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StopAtStep(L.Callback):
    """Raises at the start of the first batch after ``step`` optimizer steps: a crash right after a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("stopped")


def _fit(tmp_path, ckpt_path=None, stop_at: int | None = None, class_balance: float = 0.0) -> BatchRecorder:
    torch.manual_seed(123 if ckpt_path is None else 456)  # a resumed run's global RNG differs from the first's
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[saver] + ([StopAtStep(stop_at)] if stop_at else []))
    module = BatchRecorder()
    try:
        trainer.fit(module, datamodule=NoiseImages(class_balance), ckpt_path=ckpt_path, weights_only=True)
    except RuntimeError as error:
        assert str(error) == "stopped"
    return module


@pytest.mark.parametrize("class_balance", [0.0, 1.0])
def test_a_run_stopped_mid_epoch_resumes_with_the_batches_of_an_uninterrupted_run(tmp_path, class_balance):
    whole = _fit(tmp_path / "whole", class_balance=class_balance)
    # saved after step 4: epoch 1, after its first batch of 3
    stopped = _fit(tmp_path / "stopped", stop_at=4, class_balance=class_balance)
    state = torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"] == [{"epoch": 1, "batches": 1}]
    resumed = _fit(tmp_path / "stopped", ckpt_path=tmp_path / "stopped" / "last.ckpt", class_balance=class_balance)
    got = stopped.seen[:4] + resumed.seen
    assert len(got) == len(whole.seen) == 8
    for step, ((want_images, want_labels), (images, labels)) in enumerate(zip(whole.seen, got)):
        assert torch.equal(labels, want_labels), step
        assert torch.equal(images, want_images), step  # the same random crops and flips
    assert resumed.weight.item() == pytest.approx(whole.weight.item(), abs=1e-7)


# -- class balance on the image DataModules -------------------------------------------------------------------


def test_image_folder_draws_its_classes_equally_often_with_class_balance_one(tmp_path):
    from PIL import Image

    for name, count in (("a", 28), ("b", 8), ("c", 4)):  # 70% / 20% / 10%
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    (tmp_path / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "a" / "0.png")
    data = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=8, class_balance=1.0)
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler)
    labels_N = data.train_set.labels
    assert torch.bincount(labels_N).tolist() == [28, 8, 4]
    # one epoch's batches hold the sampler's rows
    batch_labels = torch.cat([labels for _, labels in loader])
    assert torch.equal(batch_labels, labels_N[torch.tensor(list(loader.sampler.epoch_rows()))])
    drawn = []
    for epoch in range(30):
        loader.sampler.set_epoch(epoch)
        drawn += list(loader.sampler)
    shares = torch.bincount(labels_N[torch.tensor(drawn)], minlength=3).double() / len(drawn)
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05, rtol=0)
    unbalanced = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=8)
    assert type(unbalanced.train_dataloader().sampler) is ResumableSampler


@pytest.mark.parametrize("value", [1.5, -0.1, "1", True])
def test_a_class_balance_outside_0_1_fails_in_every_var_data_module(tmp_path, value):
    from varlib.data.emoji import EmojiDataModule
    from varlib.data.token_cache import TokenCacheDataModule

    message = rf"class_balance must be a number in \[0, 1\], got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=message):
        EmojiDataModule(class_balance=value)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(tmp_path), class_balance=value)
    with pytest.raises(ValueError, match=message):
        TokenCacheDataModule(str(tmp_path), class_balance=value)
