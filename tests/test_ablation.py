"""`python -m varlib.cli.ablation` at varlib.notebook's tiny size: both tokenizers and transformers train with equal
budgets, the figures land in results.json/results.md, and the pluggable sample metric scores the samples."""

import json

import pytest
import torch

from varlib.cli.ablation import main, markdown_table, transformer_overrides
from varlib.notebook import TINY_ABLATION_TOKENIZER, TINY_ABLATION_TRANSFORMER


def nearest_mean_metric(reference_images, reference_labels):
    """A stand-in metric: accuracy of a nearest-class-mean pixel classifier, and the mean pixel value."""
    means_KD = torch.stack([reference_images[reference_labels == k].flatten(1).mean(0)
                            for k in range(int(reference_labels.max()) + 1)])

    def metric(images, labels):
        predicted = torch.cdist(images.flatten(1), means_KD).argmin(1)
        return {"nearest_mean_accuracy": float((predicted == labels).float().mean()),
                "mean_pixel": float(images.mean())}
    return metric


def test_transformer_overrides_route_model_net_keys():
    assert transformer_overrides(["model.net.depth=2", "trainer.max_steps=3"], "ar") == ["model.ar.depth=2",
                                                                                         "trainer.max_steps=3"]


@pytest.mark.slow
def test_tiny_ablation_trains_both_models_at_equal_budget_and_reports(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--seeds", "3", "--per-class", "2", "--no-token-cache", "--threads", "1",
            "--metric", f"{__name__}.nearest_mean_metric"]
    for override in TINY_ABLATION_TOKENIZER:
        args += ["--tokenizer-override", override]
    for override in TINY_ABLATION_TRANSFORMER:
        args += ["--transformer-override", override]
    main(args)
    report = json.loads((tmp_path / "results.json").read_text())
    var, ar = report["results"]["3"]["var"], report["results"]["3"]["raster_ar"]
    assert var["tokens_per_image"] == 85 and ar["tokens_per_image"] == 64
    assert var["non_embedding_params"] == ar["non_embedding_params"] > 0
    assert var["steps"] == ar["steps"] == 5 and var["training_images"] == ar["training_images"] == 40
    for model in (var, ar):
        assert 5 < model["tokenizer"]["psnr"] < 60 and 0 < model["tokenizer"]["codebook_usage"] <= 1
        assert 0 <= model["samples"]["nearest_mean_accuracy"] <= 1 and 0 <= model["samples"]["mean_pixel"] <= 1
        assert model["seconds_per_image_b1"] > 0 and model["seconds_per_image_b16"] > 0
    assert (tmp_path / "seed3" / "raster_ar" / "samples.png").is_file()
    table = (tmp_path / "results.md").read_text()
    assert table == markdown_table(report["results"]) and "nearest_mean_accuracy" in table
    assert table in capsys.readouterr().out
