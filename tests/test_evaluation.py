"""Tests of varlib.evaluation: feature extractor loading, FID/IS/precision-recall, the Lightning callback,
ADM .npz files and reconstruction metrics. A tiny random conv net stands in for Inception."""

from __future__ import annotations

import math
import warnings
import zipfile
from contextlib import contextmanager

import lightning
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.extractors import TinyExtractor

from varlib.evaluation import (
    INCEPTION_WEIGHTS_FILENAME,
    AdmNpzWriter,
    GenerationMetricsCallback,
    GenerativeMetrics,
    ReconstructionMetrics,
    build_inception_extractor,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    knn_radii,
    load_adm_npz,
    load_reference,
    precision_recall,
    psnr,
    shuffle_permutation,
    write_adm_npz,
    write_reference,
)


def random_uint8_images(num: int, seed: int, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, size, size), generator=generator, dtype=torch.uint8)


# ---------------------------------------------------------------- Inception loading


def test_missing_inception_weights_error_names_file_locations_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as error:
        build_inception_extractor()
    message = str(error.value)
    assert INCEPTION_WEIGHTS_FILENAME in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "https://" in message
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        build_inception_extractor(tmp_path / "elsewhere.pth")


def test_corrupt_inception_weights_raise_value_error(tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_FILENAME
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="tensor-only state_dict"):
        build_inception_extractor(weights)


@pytest.mark.slow  # writes and loads a 95 MB state_dict (about 7 s)
def test_inception_loads_from_hub_cache_and_returns_pool_features_and_bias_free_logits(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    # torchvision's Inception3 (1008 classes, no aux head) has the same state_dict layout as the FID weights.
    torch.manual_seed(0)
    state_dict = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict()
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / INCEPTION_WEIGHTS_FILENAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    extractor = build_inception_extractor()
    assert extractor.weights_path == checkpoints / INCEPTION_WEIGHTS_FILENAME
    features_BD, logits_BK = extractor(random_uint8_images(2, seed=1, size=32))
    assert features_BD.shape == (2, 2048) and logits_BK.shape == (2, 1008)
    assert torch.isfinite(features_BD).all() and features_BD.abs().sum() > 0
    # ADM's Inception Score uses pool_3 @ W without the fc bias.
    torch.testing.assert_close(logits_BK, features_BD @ state_dict["fc.weight"].T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.rand(2, 3, 32, 32))


# ---------------------------------------------------------------- FID


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    dim = 12
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    variances_a, variances_b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    sigma_a = rotation @ np.diag(variances_a) @ rotation.T
    sigma_b = rotation @ np.diag(variances_b) @ rotation.T
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2)
    assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(1)
    factor_a, factor_b = rng.normal(size=(2, 20, 16))
    sigma_a, sigma_b = factor_a.T @ factor_a / 20, factor_b.T @ factor_b / 20
    mu_a, mu_b = rng.normal(size=(2, 16))
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * covmean)
    assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-7)


def test_fid_from_features_is_zero_for_identical_sets_and_rejects_bad_shapes():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    assert abs(fid_from_features(features, features)) < 1e-9
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)
    shifted = features + torch.tensor([1.0, 0, 0, 0, 0, 2.0])
    assert fid_from_features(features, shifted) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="N>=2"):
        feature_statistics(features[:1])
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uninformative_logits_is_one():
    is_mean, is_std = inception_score(torch.zeros(40, 7))
    assert is_mean == pytest.approx(1.0) and is_std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_two_class_closed_form():
    # p(y|x) = [q, 1-q] for half the samples and [1-q, q] for the rest: the marginal is uniform and
    # IS = exp(log 2 - H(q)) = 2 exp(-H(q)).
    q = 0.8
    logit = math.log(q / (1 - q))
    logits = torch.tensor([[logit, 0.0], [0.0, logit]], dtype=torch.float64).repeat(10, 1)
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    is_mean, _ = inception_score(logits, num_splits=1)
    assert is_mean == pytest.approx(2 * math.exp(-entropy), rel=1e-10)


def test_inception_score_depends_on_order_of_splits():
    confident_logits = 50.0 * torch.eye(10)  # one confident class per sample
    class_sorted = confident_logits.repeat_interleave(10, dim=0)  # 100 samples, 10 per class, sorted
    is_mean, is_std = inception_score(class_sorted, num_splits=10)
    assert is_mean == pytest.approx(1.0, abs=1e-6)  # each split holds a single class
    interleaved = confident_logits.repeat(10, 1)  # every split holds all 10 classes once
    assert inception_score(interleaved, num_splits=10)[0] == pytest.approx(10.0, rel=1e-6)
    # split 1: one class (IS 1); split 2: two classes (IS 2) -> mean 1.5, population std 0.5
    two_splits = torch.cat([confident_logits[[0, 0]], confident_logits[[1, 2]]])
    assert inception_score(two_splits, num_splits=2) == pytest.approx((1.5, 0.5), rel=1e-6)
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(torch.zeros(5, 3), num_splits=10)


# ---------------------------------------------------------------- precision / recall


def test_knn_radii_match_sorted_distances_with_blocking():
    points = torch.randn(23, 4, generator=torch.Generator().manual_seed(3))
    squared = torch.cdist(points.double(), points.double()) ** 2
    expected = squared.sort(dim=1).values[:, 3]  # the point itself is the 0-th neighbour
    torch.testing.assert_close(knn_radii(points, k=3, batch_size=5).double(), expected, rtol=1e-4, atol=1e-4)


def test_precision_recall_hand_made_example():
    # k=1, squared radii: reals {-50:2500, 0:1, 1:1, 10:81}; fakes {0.5:2.25, 2:2.25, 5:9, 30:625}.
    # Fakes inside the real manifold: 0.5 (near 0), 2 (distance^2 1 to 1, boundary counts), 5 (25 <= 81); not 30.
    # Reals inside the fake manifold: 0, 1 (near 0.5), 10 (400 <= 625 around 30); not -50.
    reals = torch.tensor([[-50.0], [0.0], [1.0], [10.0]])
    fakes = torch.tensor([[0.5], [2.0], [5.0], [30.0]])
    for batch_size in (1, 3, 4096):
        assert precision_recall(reals, fakes, k=1, batch_size=batch_size) == (0.75, 0.75)


def test_precision_recall_identical_and_disjoint_sets():
    points = torch.randn(30, 5, generator=torch.Generator().manual_seed(4))
    assert precision_recall(points, points.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(points, points + 1000.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4 points"):
        precision_recall(points[:3], points, k=3)


# ---------------------------------------------------------------- GenerativeMetrics


def test_generative_metrics_matches_plain_functions_on_extractor_outputs():
    extractor = TinyExtractor()
    metric = GenerativeMetrics(extractor, num_is_splits=4, pr_k=3, is_shuffle_seed=None)
    real, fake = random_uint8_images(24, seed=1), (random_uint8_images(20, seed=2) // 2)
    for batch in real.split(10):
        metric.update(batch, real=True)
    for batch in fake.split(7):
        metric.update(batch, real=False)
    results = metric.compute()
    with torch.no_grad():
        real_features, _ = extractor.eval()(real)
        fake_features, fake_logits = extractor(fake)
    assert set(results) == {"fid", "is_mean", "is_std", "precision", "recall"}
    assert results["fid"] == pytest.approx(fid_from_features(real_features, fake_features), rel=1e-6)
    assert results["fid"] > 0.01
    assert (results["is_mean"], results["is_std"]) == pytest.approx(inception_score(fake_logits, 4), rel=1e-6)
    assert (results["precision"], results["recall"]) == precision_recall(real_features, fake_features, k=3)


def test_generative_metrics_same_images_and_shuffle_against_class_sorted_order():
    extractor = TinyExtractor()
    images = random_uint8_images(20, seed=5)
    metric = GenerativeMetrics(extractor, num_is_splits=10)
    metric.update(images, real=True)
    metric.update(images, real=False)
    results = metric.compute()
    assert abs(results["fid"]) < 1e-6 and results["precision"] == 1.0 and results["recall"] == 1.0

    class SortedLogits(nn.Module):  # 10 classes x 10 samples in class order, with distinct features
        def forward(self, images_BCHW):
            classes_B = images_BCHW[:, 0, 0, 0].long()
            return images_BCHW.float().flatten(1)[:, :4], 50.0 * nn.functional.one_hot(classes_B, 10).float()

    class_sorted = torch.arange(10).repeat_interleave(10).to(torch.uint8)[:, None, None, None].expand(100, 3, 2, 2)
    class_sorted = class_sorted.clone()
    class_sorted[:, 1] = torch.randint(0, 256, (100, 2, 2), generator=torch.Generator().manual_seed(0))
    scores = {}
    for seed in (None, 0):
        metric = GenerativeMetrics(SortedLogits(), num_is_splits=10, is_shuffle_seed=seed)
        metric.update(class_sorted, real=True)
        metric.update(class_sorted, real=False)
        scores[seed] = metric.compute()["is_mean"]
    assert scores[None] == pytest.approx(1.0, abs=1e-6)
    assert scores[0] > 4.0


def test_generative_metrics_validates_input_and_keeps_extractor_in_eval():
    metric = GenerativeMetrics(TinyExtractor())
    metric.train()
    assert not metric.extractor.training
    with pytest.raises(ValueError, match="uint8"):
        metric.update(torch.rand(2, 3, 8, 8), real=True)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        metric.update(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), real=True)
    with pytest.raises(ValueError, match="real and generated"):
        metric.compute()
    metric.update(random_uint8_images(4, seed=0), real=True)
    metric.update(random_uint8_images(4, seed=1), real=False)
    with pytest.raises(ValueError, match="num_splits"):
        metric.compute()


# ---------------------------------------------------------------- Lightning callback


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


def test_reference_statistics_equal_one_shot_statistics_and_keep_a_uniform_sample(tmp_path):
    images = random_uint8_images(50, seed=3)
    written = write_reference(tmp_path / "ref.npz", TinyExtractor(), images.split(8), keep_images=20, seed=1)
    mu, sigma = feature_statistics(TinyExtractor().eval()(images)[0].detach())
    loaded = load_reference(tmp_path / "ref.npz")
    np.testing.assert_allclose(loaded.mu, mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(loaded.sigma, sigma, rtol=0, atol=1e-10)
    assert loaded.images_NHWC.shape == (20, 16, 16, 3) and np.array_equal(loaded.images_NHWC, written.images_NHWC)
    all_rows = {image.tobytes() for image in images.permute(0, 2, 3, 1).numpy()}
    kept_rows = {image.tobytes() for image in loaded.images_NHWC}
    assert len(kept_rows) == 20 and kept_rows <= all_rows
    first_twenty = {image.tobytes() for image in images[:20].permute(0, 2, 3, 1).numpy()}
    assert kept_rows != first_twenty  # a sample of all 50, not the first ones


def test_reference_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_reference(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz.*unreadable"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="missing \\['mu', 'sigma'\\]"):
        load_reference(tmp_path / "images_only.npz")


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


# ---------------------------------------------------------------- ADM .npz


def numbered_images(num: int, size: int = 4) -> np.ndarray:
    """(N,size,size,3) uint8 where image i is filled with i, so rows can be identified after shuffling."""
    return np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None], (num, size, size, 3)).copy()


def test_write_adm_npz_round_trip_is_a_seeded_shuffle(tmp_path):
    images = numbered_images(12)
    path = write_adm_npz(tmp_path / "samples", images, seed=3)
    assert path.name == "samples.npz"
    loaded = load_adm_npz(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (12, 4, 4, 3)
    order = loaded[:, 0, 0, 0].astype(int)
    assert sorted(order) == list(range(12)) and list(order) != list(range(12))
    np.testing.assert_array_equal(loaded, images[shuffle_permutation(12, 3)])
    np.testing.assert_array_equal(load_adm_npz(write_adm_npz(tmp_path / "again.npz", images, seed=3)), loaded)
    other = load_adm_npz(write_adm_npz(tmp_path / "other.npz", images, seed=4))
    assert list(other[:, 0, 0, 0]) != list(order)
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        # the ADM evaluator streams the array and only understands format versions 1.0 and 2.0
        assert np.lib.format.read_magic(member) == (1, 0)


def test_write_adm_npz_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "a.npz", numbered_images(3).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N,H,W,3\)"):
        write_adm_npz(tmp_path / "a.npz", numbered_images(3).transpose(0, 3, 1, 2))
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize("use_memmap", [True, False])
def test_streaming_writer_equals_one_shot_write(tmp_path, use_memmap):
    images = numbered_images(30, size=6)
    with AdmNpzWriter(tmp_path / "stream.npz", 30, 6, 6, seed=1, use_memmap=use_memmap) as writer:
        writer.add(images[:7])
        as_tensor_01 = torch.from_numpy(images[7:20]).permute(0, 3, 1, 2).float() / 255.0
        writer.add(as_tensor_01)
        writer.add(torch.from_numpy(images[20:]).permute(0, 3, 1, 2))
    expected = load_adm_npz(write_adm_npz(tmp_path / "direct.npz", images, seed=1))
    np.testing.assert_array_equal(load_adm_npz(tmp_path / "stream.npz"), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.npz", "stream.npz"]  # scratch file removed


def test_streaming_writer_errors_and_no_file_after_exception(tmp_path):
    writer = AdmNpzWriter(tmp_path / "s.npz", 5, 4, 4)
    with pytest.raises(ValueError, match=r"size \(4, 4, 3\)"):
        writer.add(numbered_images(2, size=5))
    writer.add(numbered_images(3))
    with pytest.raises(ValueError, match="at most 5"):
        writer.add(numbered_images(3))
    with pytest.raises(ValueError, match="expected 5 images, got 3"):
        writer.close()
    assert writer.close(allow_partial=True) == tmp_path / "s.npz"
    assert load_adm_npz(tmp_path / "s.npz").shape == (3, 4, 4, 3)

    with pytest.raises(RuntimeError, match="generation failed"):
        with AdmNpzWriter(tmp_path / "t.npz", 5, 4, 4) as failing:
            failing.add(numbered_images(2))
            raise RuntimeError("generation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


# ---------------------------------------------------------------- reconstruction quality


def test_psnr_closed_form_per_image():
    target = torch.zeros(3, 3, 8, 8)
    offsets = torch.tensor([0.1, 0.5, 0.0])
    recon = target + offsets[:, None, None, None]
    per_image, mean = psnr(recon, target, data_range=2.0)
    expected = 10 * torch.log10(4.0 / offsets[:2].double() ** 2)
    torch.testing.assert_close(per_image[:2], expected)
    assert math.isinf(per_image[2].item())
    assert math.isinf(mean.item())
    with pytest.raises(ValueError, match="one shape"):
        psnr(recon, target[:2], data_range=2.0)


def test_reconstruction_metrics_on_signed_images():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    recon = (target + 0.1 * torch.randn(4, 3, 16, 16, generator=generator)).clamp(-1, 1)

    def mean_abs(x, y):  # checks it receives [-1,1] images
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5
        return (x - y).abs().mean(dim=(1, 2, 3))

    metrics = ReconstructionMetrics(perceptual=mean_abs, prefix="val/")
    metrics.update(recon[:2], target[:2])
    metrics.update(recon[2:], target[2:])
    results = metrics.compute()
    assert set(results) == {"val/psnr", "val/ssim", "val/lpips"}
    assert results["val/psnr"].item() == pytest.approx(psnr(recon, target, data_range=2.0)[1].item(), rel=1e-5)
    assert results["val/lpips"].item() == pytest.approx((recon - target).abs().mean().item(), rel=1e-5)
    assert 0.0 < results["val/ssim"].item() < 1.0

    identical = ReconstructionMetrics()
    assert identical(target, target)["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one distance per image"):
        ReconstructionMetrics(perceptual=lambda x, y: (x - y).abs())(recon, target)


def test_reconstruction_metrics_accept_lpips_module_and_keep_it_in_eval():
    import lpips

    torch.manual_seed(0)
    perceptual = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)  # random, no download
    metrics = ReconstructionMetrics(perceptual=perceptual)
    metrics.train()
    assert not perceptual.training  # LPIPS has dropout layers
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert metrics(images, images)["lpips"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics(images, images.flip(0))["lpips"].item() > 0
