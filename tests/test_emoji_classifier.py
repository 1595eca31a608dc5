"""The shipped emoji classifier: loading, the FeatureExtractor interface, the emoji protocol's pieces, and the
step progress bar of step-defined runs."""

from __future__ import annotations

import json
import math

import lightning
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from varlib.evaluation import GenerativeMetrics, fid_from_features
from varlib.evaluation.emoji_classifier import (
    EMOJI_CLASSIFIER_CALIBRATION,
    EMOJI_CLASSIFIER_WEIGHTS,
    FEATURE_DIM,
    EmojiClassifier,
    balanced_draw,
    blur,
    emoji_metric,
    emoji_scores,
    halfway_progress,
    load_emoji_classifier,
)
from varlib.training.progress import StepProgressBar


def load_calibration() -> dict:
    """The calibration figures written by ``scripts/train_emoji_classifier.py`` beside the shipped weights."""
    return json.loads(EMOJI_CLASSIFIER_CALIBRATION.read_text())


@pytest.fixture(scope="module")
def classifier() -> EmojiClassifier:
    return load_emoji_classifier()


def test_shipped_classifier_loads_in_eval_mode_with_nine_classes(classifier):
    assert EMOJI_CLASSIFIER_WEIGHTS.is_file()
    assert not classifier.training and classifier.num_classes == 9
    assert EMOJI_CLASSIFIER_WEIGHTS.stat().st_size < 5_000_000


def test_feature_extractor_interface_on_uint8_images_of_any_size(classifier):
    images = torch.randint(0, 256, (5, 3, 48, 40), dtype=torch.uint8)
    features, logits = classifier(images)
    assert features.shape == (5, FEATURE_DIM) and logits.shape == (5, 9)
    assert features.dtype == logits.dtype == torch.float32
    # the float entry point gives the same features and softmax probabilities
    same_features, probs = classifier.classify(images.float() / 255)
    torch.testing.assert_close(same_features, features)
    torch.testing.assert_close(probs, logits.softmax(dim=1))
    with pytest.raises(ValueError, match="uint8"):
        classifier(images.float())
    with pytest.raises(ValueError, match=r"float images \(B,3,H,W\)"):
        classifier.classify(images)


def test_classifier_plugs_into_generative_metrics(classifier):
    metric = GenerativeMetrics(classifier, num_is_splits=2)
    generator = torch.Generator().manual_seed(0)
    metric.update(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator), real=True)
    metric.update(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator), real=False)
    results = metric.compute()
    assert set(results) == {"fid", "is_mean", "is_std", "precision", "recall"}
    assert results["fid"] >= 0 and 1.0 <= results["is_mean"] <= 9.0


def test_shipped_calibration_orders_real_blurred_noise():
    points = load_calibration()["calibration"]
    real, blurred, noise = points["real"], points["blurred_8x8"], points["noise"]
    assert real["class_accuracy"] > blurred["class_accuracy"] > noise["class_accuracy"]
    assert real["feature_distance"] < blurred["feature_distance"] < noise["feature_distance"]


def test_emoji_metric_on_the_held_out_set_reproduces_the_shipped_calibration(classifier):
    from varlib.pipelines.stages import held_out_images

    images, labels = held_out_images(32)
    metric = emoji_metric(images, labels, per_class=50, seed=0, classifier=classifier)
    real_draw = balanced_draw(labels, 9, per_class=50, seed=1)  # the calibration's ``real`` set
    scores = metric(images[real_draw], labels[real_draw])
    shipped = load_calibration()["calibration"]  # measured by scripts/train_emoji_classifier.py
    for point in ("real", "blurred_8x8", "noise"):
        assert scores["calibration"][point] == pytest.approx(shipped[point], rel=1e-4, abs=1e-5)
    assert scores["class_accuracy"] == pytest.approx(shipped["real"]["class_accuracy"], abs=1e-6)
    assert scores["feature_distance"] == pytest.approx(shipped["real"]["feature_distance"], rel=1e-4)
    assert scores["halfway_progress"] == pytest.approx({"class_accuracy": 1.0, "feature_distance": 1.0})
    assert scores["per_class"] == 50
    with pytest.raises(ValueError, match="one label per held-out image"):
        emoji_metric(images, labels[:-1], classifier=classifier)


def test_loading_errors_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a safetensors file"):
        load_emoji_classifier(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_emoji_classifier(corrupt)
    other = tmp_path / "other.safetensors"
    save_file(nn.Linear(3, 9).state_dict(), other)
    with pytest.raises(ValueError, match="does not hold EmojiClassifier weights"):
        load_emoji_classifier(other)


def test_balanced_draw_takes_per_class_items_of_each_class_using_every_item():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    draw = balanced_draw(labels, 3, per_class=4, seed=0)
    assert draw.shape == (12,)
    assert labels[draw].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert set(draw[:4].tolist()) == {0, 1, 2} and draw[4:8].tolist() == [3] * 4
    assert len(set(draw[8:].tolist())) == 4  # a class with enough items is drawn without repeats
    assert torch.equal(draw, balanced_draw(labels, 3, per_class=4, seed=0))
    with pytest.raises(ValueError, match="class 3 has no images"):
        balanced_draw(labels, 4, per_class=2, seed=0)


def test_blur_keeps_shape_and_removes_detail():
    checkerboard = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    images = checkerboard.float().expand(2, 3, 32, 32)
    blurred = blur(images)
    assert blurred.shape == images.shape
    torch.testing.assert_close(blurred, torch.full_like(images, 0.5), atol=0.02, rtol=0)


def test_emoji_scores_of_a_set_against_its_own_features(classifier):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(18, 3, 32, 32, generator=generator)
    features, probs = classifier.classify(images)
    predicted = probs.argmax(dim=1)
    labels = torch.arange(9).repeat_interleave(2)
    scores = emoji_scores(classifier, images, labels, features, batch_size=5)
    expected = torch.stack([(predicted[labels == c] == c).float().mean() for c in range(9)]).mean()
    assert scores["class_accuracy"] == pytest.approx(float(expected))
    assert scores["feature_distance"] == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(18, 3, 32, 32, generator=generator).mul(0.3)
    assert emoji_scores(classifier, other, labels, features)["feature_distance"] == pytest.approx(
        fid_from_features(features, classifier.classify(other)[0]))


def test_halfway_progress_is_zero_at_blurred_and_one_at_real():
    points = {"real": {"class_accuracy": 0.6, "feature_distance": 1.0},
              "blurred_8x8": {"class_accuracy": 0.3, "feature_distance": 21.0}}
    progress = halfway_progress({"class_accuracy": 0.45, "feature_distance": 6.0}, points)
    assert progress == pytest.approx({"class_accuracy": 0.5, "feature_distance": 0.75})
    points["real"]["class_accuracy"] = 0.3
    assert math.isnan(halfway_progress({"class_accuracy": 0.45, "feature_distance": 6.0}, points)["class_accuracy"])


class CountingModule(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_step_progress_bar_counts_steps_across_epochs(tmp_path):
    bar = StepProgressBar(refresh_rate=1)
    trainer = lightning.Trainer(max_steps=7, max_epochs=-1, callbacks=[bar], logger=False,
                                enable_checkpointing=False, enable_model_summary=False,
                                default_root_dir=tmp_path, accelerator="cpu")
    loader = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 steps per epoch
    trainer.fit(CountingModule(), loader)
    assert trainer.global_step == 7 and trainer.current_epoch >= 2  # the bar outlived two epoch starts
    assert bar.train_progress_bar.total == 7 and bar.train_progress_bar.n == 7


def test_varlib_evaluate_scores_with_the_emoji_classifier(classifier, tmp_path):
    import numpy as np

    import varlib
    from varlib.evaluation.sampling_eval import evaluate_samples
    from varlib.configs import compose_config
    from varlib.evaluation import load_adm_npz, write_adm_npz

    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    path = tmp_path / "tiny_var.safetensors"
    varlib.save_var(varlib.VAR(vae, varlib.VARConfig(depth=1, num_classes=9, width=32, num_heads=2)), path)
    reference_NHWC = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    write_adm_npz(tmp_path / "reference.npz", reference_NHWC)
    config = compose_config("evaluate", [
        f"checkpoint={path}", "num_per_class=2", "batch_size=9", "num_is_splits=2", "device=cpu",
        f"out_dir={tmp_path / 'eval'}", f"reference_npz={tmp_path / 'reference.npz'}",
        "inception._target_=varlib.evaluation.load_emoji_classifier", "inception.weights_path=null"])
    result = evaluate_samples(config)

    samples_BCHW = torch.from_numpy(load_adm_npz(result.npz_path)).permute(0, 3, 1, 2)
    real_features, _ = classifier(torch.from_numpy(reference_NHWC).permute(0, 3, 1, 2))
    fake_features, _ = classifier(samples_BCHW)
    assert result.num_images == 18 and result.num_reference_images == 12
    assert result.metrics["fid"] == pytest.approx(fid_from_features(real_features, fake_features), rel=1e-4)
    assert 1.0 <= result.metrics["is_mean"] <= 9.0


# -- make demo -------------------------------------------------------------------------------------------------


def test_demo_stages_are_defined_by_steps_not_by_the_clock():
    from varlib.configs import compose_config

    tokenizer = compose_config("train", ["experiment=demo_tokenizer"])
    var = compose_config("train", ["experiment=var_emoji"])
    for cfg in (tokenizer, var):
        assert cfg.trainer.max_time is None and cfg.trainer.max_steps > 0
        assert cfg.callbacks.progress_bar._target_ == "varlib.training.progress.StepProgressBar"
    assert tokenizer.model.optim.decay_by_time is False
