"""varlib.evaluation.generative_metrics: FID, IS, precision/recall and GenerativeMetrics. A tiny random conv net
stands in for Inception."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from helpers.extractors import TinyExtractor, random_uint8_images

from varlib.evaluation.generative_metrics import GenerativeMetrics, feature_statistics, fid_from_features
from varlib.evaluation.generative_metrics import frechet_distance, inception_score, knn_radii, precision_recall


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
