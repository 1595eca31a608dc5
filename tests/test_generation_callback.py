"""varlib.evaluation.generation_callback: the in-loop FID/IS callback against a reference file."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.extractors import TinyExtractor, random_uint8_images

from varlib.evaluation import (
    INCEPTION_WEIGHTS_FILENAME,
    GenerationMetricsCallback,
    build_inception_extractor,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    write_reference,
)


class TinyGenerator(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seeds: list[int] = []

    def training_step(self, batch, batch_index):
        return self.layer(torch.ones(1, 2)).sum()

    def validation_step(self, batch, batch_index):
        self.log("val/loss", self.layer(torch.ones(1, 2)).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @contextmanager
    def image_generator(self):
        def generate(labels_B: torch.Tensor, seed: int) -> torch.Tensor:
            self.seeds.append(seed)
            return torch.rand(labels_B.shape[0], 3, 16, 16, generator=torch.Generator().manual_seed(seed))

        yield generate


class TinyDataModule(lightning.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(9)
        self.images = torch.rand(40, 3, 16, 16, generator=generator) * 2 - 1
        self.labels = torch.arange(40) % 4

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8)


def make_trainer(callback: GenerationMetricsCallback, max_epochs: int, logger=False) -> lightning.Trainer:
    return lightning.Trainer(
        max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, callbacks=[callback],
    )


@pytest.fixture
def reference_file(tmp_path):
    """Reference statistics of 40 random 16 px images (all of them kept) under the tiny extractor."""
    images = random_uint8_images(40, seed=9)
    write_reference(tmp_path / "reference.npz", TinyExtractor(), images.split(7), keep_images=40)
    return tmp_path / "reference.npz"


def test_generation_metrics_callback_logs_metrics_and_grid_against_reference_file(reference_file, tmp_path):
    callback = GenerationMetricsCallback(TinyExtractor, str(reference_file), num_classes=4, num_per_class=5,
                                         batch_size=6, seed=100, num_is_splits=2, grid_images=4)
    logger = lightning.pytorch.loggers.TensorBoardLogger(tmp_path / "tb", name="", version=0)
    trainer = make_trainer(callback, max_epochs=1, logger=logger)
    module = TinyGenerator()
    trainer.fit(module, datamodule=TinyDataModule())
    assert module.seeds == [100, 101, 102, 103]  # 20 labels in batches of 6
    fake = torch.cat([torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(100 + i))
                      for i, n in enumerate((6, 6, 6, 2))])
    fake_features, fake_logits = TinyExtractor().eval()((fake * 255).round().to(torch.uint8))
    reference = load_reference(reference_file)
    want_fid = frechet_distance(reference.mu, reference.sigma, *feature_statistics(fake_features.detach()))
    want_is = inception_score(fake_logits.detach()[torch.randperm(20, generator=torch.Generator().manual_seed(0))], 2)[0]
    real_features = TinyExtractor().eval()(torch.from_numpy(reference.images_NHWC).permute(0, 3, 1, 2))[0]
    want_precision, want_recall = precision_recall(real_features.detach(), fake_features.detach(), 3)
    logged = trainer.callback_metrics
    assert float(logged["val/fid"]) == pytest.approx(want_fid, rel=1e-5) and want_fid > 0
    assert float(logged["val/is"]) == pytest.approx(want_is, rel=1e-5)
    assert float(logged["val/precision"]) == pytest.approx(want_precision)
    assert float(logged["val/recall"]) == pytest.approx(want_recall)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    grid = events.Images("val/generated")[0]
    assert (grid.height, grid.width) == (2 + 2 * 18, 2 + 2 * 18)  # 4 images of 16 px, 2 columns, padding 2


def test_generation_metrics_callback_warns_once_and_training_goes_on_without_weights(tmp_path, reference_file):
    missing = tmp_path / INCEPTION_WEIGHTS_FILENAME
    callback = GenerationMetricsCallback(lambda: build_inception_extractor(missing), str(reference_file),
                                         num_classes=4, num_per_class=5)
    trainer = make_trainer(callback, max_epochs=2)
    module = TinyGenerator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=TinyDataModule())
    disabled = [w for w in caught if "GenerationMetricsCallback is disabled" in str(w.message)]
    assert len(disabled) == 1 and INCEPTION_WEIGHTS_FILENAME in str(disabled[0].message)
    assert trainer.current_epoch == 2 and "val/fid" not in trainer.callback_metrics
    assert module.seeds == []


def test_generation_metrics_callback_warns_about_an_absent_reference(tmp_path):
    callback = GenerationMetricsCallback(TinyExtractor, str(tmp_path / "absent.npz"), num_classes=4, num_per_class=5)
    with pytest.warns(UserWarning, match="absent.npz"):
        make_trainer(callback, max_epochs=1).fit(TinyGenerator(), datamodule=TinyDataModule())


def test_generation_metrics_callback_rejects_too_few_images():
    with pytest.raises(ValueError, match="too few"):
        GenerationMetricsCallback(TinyExtractor(), "reference.npz", num_classes=2, num_per_class=2)


def test_only_rank_zero_scores_and_the_other_ranks_receive_its_values(reference_file, monkeypatch):
    """Every rank holds the gathered features; rank 0 alone computes the float64 FID and the N x N precision/recall,
    and broadcasts them (here rank 1 of 2, with a strategy whose gather repeats this rank's rows)."""
    from types import SimpleNamespace

    import varlib.evaluation.generation_callback as generation_callback

    def not_on_this_rank(*args, **kwargs):
        raise AssertionError("rank 1 computed a score that rank 0 computes")

    for name in ("frechet_distance", "inception_score", "precision_recall"):
        monkeypatch.setattr(generation_callback, name, not_on_this_rank)
    rank_zero_values = {"fid": 12.5, "is": 1.5, "precision": 0.25, "recall": 0.75}
    broadcasts = []

    def broadcast(obj, src):
        broadcasts.append((obj, src))
        return rank_zero_values

    strategy = SimpleNamespace(root_device=torch.device("cpu"), all_gather=lambda t: torch.stack([t, t]),
                               broadcast=broadcast)
    trainer = SimpleNamespace(global_rank=1, world_size=2, strategy=strategy, global_step=0, loggers=[])
    callback = GenerationMetricsCallback(TinyExtractor, str(reference_file), num_classes=4, num_per_class=5,
                                         batch_size=6, num_is_splits=2, grid_images=0)
    module = TinyGenerator()
    assert callback._prepare(module)
    assert callback.evaluate(trainer, module) == rank_zero_values
    assert broadcasts == [(None, 0)] and module.seeds == [1, 3]  # this rank generated batches 1 and 3 of 4
