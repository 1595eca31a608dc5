"""`varlib-ablation` at its tiny size (conf/experiment/tiny_ablation_*.yaml): both tokenizers and transformers train with equal
budgets, the figures land in results.json/results.md, the emoji classifier scores the samples by default and a
pluggable sample metric replaces it."""

import json

import pytest
import torch

from helpers.runs import untrained_validation

from varlib.cli import ablation
from varlib.configs import compose_config
from varlib.pipelines.ablation import TINY_ABLATION_MODELS, ablation_table, sample_figures


def nearest_mean_metric(reference_images, reference_labels):
    """A stand-in metric: accuracy of a nearest-class-mean pixel classifier, and the mean pixel value."""
    means_KD = torch.stack([reference_images[reference_labels == k].flatten(1).mean(0)
                            for k in range(int(reference_labels.max()) + 1)])

    def metric(images, labels):
        predicted = torch.cdist(images.flatten(1), means_KD).argmin(1)
        return {"nearest_mean_accuracy": float((predicted == labels).float().mean()),
                "mean_pixel": float(images.mean())}
    return metric


def test_table_flattens_nested_figures_and_gives_calibration_points_rows():
    points = {"real": {"class_accuracy": 0.7, "feature_distance": 0.05},
              "blurred_8x8": {"class_accuracy": 0.33, "feature_distance": 12.7}}
    samples = {"class_accuracy": 0.5, "feature_distance": 6.0, "per_class": 50, "calibration": points,
               "halfway_progress": {"class_accuracy": 0.45, "feature_distance": 0.53}}
    assert sample_figures(samples) == {"class_accuracy": 0.5, "feature_distance": 6.0,
                                       "halfway_progress/class_accuracy": 0.45,
                                       "halfway_progress/feature_distance": 0.53}
    model = {"tokenizer": {"psnr": 20.0, "ssim": 0.7}, "tokens_per_image": 130, "non_embedding_params": 10,
             "steps": 5, "training_images": 40, "samples": samples, "seconds_per_image_b1": 0.1,
             "seconds_per_image_b16": 0.01}
    rows = ablation_table({"0": {"var": model}}).splitlines()
    assert len(rows) == 2 + 1 + 2
    assert rows[0].split(" | ")[8:12] == ["class_accuracy", "feature_distance", "halfway_progress/class_accuracy",
                                          "halfway_progress/feature_distance"]
    assert "| 0 | var | 130 | 20.00 | 0.700 | 10 | 5 | 40 | 0.5 | 6 | 0.45 | 0.53 | 0.1000 | 0.0100 |" == rows[2]
    assert rows[3] == "| 0 | *real* (calibration) |  |  |  |  |  |  | 0.7 | 0.05 |  |  |  |  |"


@pytest.mark.slow
def test_tiny_ablation_trains_both_models_at_equal_budget_and_reports(tmp_path, capsys):
    # a peak lr of 1e-2 for both transformers, so that 5 steps move their held-out loss
    cfg = compose_config("ablation", [f"out_dir={tmp_path}", "seeds=[3]", "per_class=2", "token_cache=false",
                                      "cpu_threads=1", "transformer_overrides=['model.optim.lr=1e-2']",
                                      *(f"models.{name}=[{tokenizer},{net}]"
                                        for name, (tokenizer, net) in TINY_ABLATION_MODELS.items())])
    ablation.run(cfg)  # the default sample metric: the demo's emoji classifier protocol
    report = json.loads((tmp_path / "results.json").read_text())
    var, ar = report["results"]["3"]["var"], report["results"]["3"]["raster_ar"]
    assert var["tokens_per_image"] == 85 and ar["tokens_per_image"] == 64
    assert var["non_embedding_params"] == ar["non_embedding_params"] > 0
    assert var["steps"] == ar["steps"] == 5 and var["training_images"] == ar["training_images"] == 40
    # each model against itself before training (same configs and seed; measured: tokenizers +0.47 and +0.40 dB,
    # transformers' held-out loss_last -1.06 and -1.50)
    for name, model in (("var", var), ("raster_ar", ar)):
        tokenizer_overrides = ["experiment=tiny_ablation_tokenizer", "seed=3"]
        if name == "raster_ar":
            tokenizer_overrides += ["model.vae.patch_nums=[8]", "model.vae.share_quant_resi=1"]
        before = untrained_validation(tokenizer_overrides)
        assert model["tokenizer"]["psnr"] > before["val/psnr"] + 0.2, (name, before["val/psnr"], model["tokenizer"])
        experiment = TINY_ABLATION_MODELS[name][1]
        tokenizer = tmp_path / "seed3" / name / "tokenizer" / "model.safetensors"
        before = untrained_validation([
            f"experiment={experiment}", "seed=3", f"model.tokenizer_path={tokenizer}", "data=emoji", "~data.root",
            "data.image_size=32", "model.optim.lr=1e-2"])
        assert model["val_loss_last"] < before["val/loss_last"] - 0.5, (name, before["val/loss_last"], model)
        assert 0 < model["tokenizer"]["codebook_usage"] <= 1
        emoji = model["samples"]
        assert 0 <= emoji["class_accuracy"] <= 1 and emoji["feature_distance"] > 0 and emoji["per_class"] == 2
        assert set(emoji["calibration"]) == {"real", "blurred_8x8", "noise"}
        assert emoji["calibration"]["real"]["class_accuracy"] > emoji["calibration"]["noise"]["class_accuracy"]
        assert model["seconds_per_image_b1"] > 0 and model["seconds_per_image_b16"] > 0
    assert var["samples"]["calibration"] == ar["samples"]["calibration"]  # one reference set for both
    assert var["sampling"] == ar["sampling"] == {"cfg": 2.0, "top_k": 50, "top_p": 0.75}  # the experiments' own
    assert (tmp_path / "seed3" / "raster_ar" / "samples.png").is_file()
    table = (tmp_path / "results.md").read_text()
    assert table == ablation_table(report["results"]) and "*blurred_8x8* (calibration)" in table
    assert table in capsys.readouterr().out

    # the pluggable metric, on the same trained models (finished stages are reused, not retrained)
    cfg.metric = f"{__name__}.nearest_mean_metric"
    ablation.run(cfg)
    rerun = json.loads((tmp_path / "results.json").read_text())["results"]["3"]
    for name in ("var", "raster_ar"):
        samples = rerun[name]["samples"]
        assert set(samples) == {"nearest_mean_accuracy", "mean_pixel"}
        assert 0 <= samples["nearest_mean_accuracy"] <= 1 and 0 <= samples["mean_pixel"] <= 1
        assert rerun[name]["tokenizer"] == report["results"]["3"][name]["tokenizer"]
    assert "nearest_mean_accuracy" in (tmp_path / "results.md").read_text()
