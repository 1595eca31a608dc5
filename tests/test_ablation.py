"""`varlib-ablation` at its tiny size (conf/experiment/tiny_ablation_*.yaml): the paper's Table 3 rows, cumulatively (raster AR, VAR bare,
+AdaLN, +top-k, +guidance, +attention normalisation, +depth) train and sample at equal budgets, the figures land in
results.json/results.md, the emoji classifier scores the samples by default and a pluggable sample metric replaces
it."""

import json

import pytest
import torch

from varlib.cli import ablation
from varlib.configs import compose_config
from varlib.pipelines.ablation import ABLATION_ROWS, TINY_ABLATION_MODELS, ablation_table


def nearest_mean_metric(reference_images, reference_labels):
    """A stand-in metric: accuracy of a nearest-class-mean pixel classifier, and the mean pixel value."""
    means_KD = torch.stack([reference_images[reference_labels == k].flatten(1).mean(0)
                            for k in range(int(reference_labels.max()) + 1)])

    def metric(images, labels):
        predicted = torch.cdist(images.flatten(1), means_KD).argmin(1)
        return {"nearest_mean_accuracy": float((predicted == labels).float().mean()),
                "mean_pixel": float(images.mean())}
    return metric


def row_result(accuracy, distance, sampling, depth=3):
    return {"tokens_per_image": 130, "depth": depth, "non_embedding_params": 1_057_414, "sampling": sampling,
            "samples": {"class_accuracy": accuracy, "feature_distance": distance,
                        "calibration": {"real": {"class_accuracy": 0.716, "feature_distance": 0.05},
                                        "blurred_8x8": {"class_accuracy": 0.333, "feature_distance": 12.7}}},
            "seconds_per_image_b1": 0.07}


def test_table_gives_each_row_its_switches_the_paper_fid_and_the_seed_spread():
    own = {"cfg": 2.0, "top_k": 50, "top_p": 0.75}
    results = {seed: {row.name: row_result(0.5 + 0.1 * seed, 6.0 - seed, row.sampling(own)) for row in ABLATION_ROWS}
               for seed in (0, 1)}
    lines = ablation_table({str(k): v for k, v in results.items()}).splitlines()
    assert len(lines) == 2 + len(ABLATION_ROWS) + 2
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[0] for c in cells[2:9]] == ["raster_ar", "var", "adaln", "top_k", "cfg", "attn_norm", "depth"]
    assert [c[2] for c in cells[2:9]] == ["18.65", "5.22", "4.95", "4.64", "3.60", "3.30", "1.73"]
    bare, top_k, cfg, attn_norm = cells[3], cells[5], cells[6], cells[7]
    assert bare[4:6] == ["-", "-"] and bare[8:10] == ["off", "off"]
    assert top_k[4] == "yes" and top_k[8:10] == ["50 / 0.75", "off"]
    assert cfg[8:10] == ["50 / 0.75", "2"] and attn_norm[4:6] == ["yes", "yes"]
    assert cells[0][10:12] == ["class_accuracy (2 seeds)", "feature_distance (2 seeds)"]
    assert bare[10:12] == ["0.550 (0.500-0.600)", "5.500 (5.000-6.000)"]  # mean (min-max) over the seeds
    assert cells[-2][0] == "*real* (calibration)" and cells[-2][10:12] == ["0.716", "0.050"]


def test_rows_switch_sampling_off_and_scale_depth():
    own = {"cfg": 2.0, "top_k": 50, "top_p": 0.75}
    rows = {row.name: row for row in ABLATION_ROWS}
    assert rows["adaln"].sampling(own) == {"cfg": 0.0, "top_k": 0, "top_p": 0.0}
    assert rows["top_k"].sampling(own) == {"cfg": 0.0, "top_k": 50, "top_p": 0.75}
    assert rows["cfg"].sampling(own) == own
    assert rows["var"].model_overrides(3) == ["model.var.adaln=false", "model.var.attn_l2_norm=false"]
    assert rows["depth"].model_overrides(3)[-1] == "model.var.depth=6"
    # each row adds one thing to the one before
    assert [r.model for r in ABLATION_ROWS] == ["raster_ar", "var", "adaln", "adaln", "adaln", "attn_norm", "depth"]


@pytest.mark.slow
def test_tiny_ablation_trains_every_row_at_equal_budget_and_reports(tmp_path, capsys):
    # a peak lr of 1e-2 for every transformer, so that 5 steps move their held-out loss
    cfg = compose_config("ablation", [f"out_dir={tmp_path}", "seeds=[3]", "per_class=2", "token_cache=false",
                                      "cpu_threads=1", "transformer_overrides=['model.optim.lr=1e-2']",
                                      *(f"models.{name}=[{tokenizer},{net}]"
                                        for name, (tokenizer, net) in TINY_ABLATION_MODELS.items())])
    ablation.run(cfg)  # the default sample metric: the demo's emoji classifier protocol
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]["3"]
    assert list(rows) == [row.name for row in ABLATION_ROWS]
    assert rows["raster_ar"]["tokens_per_image"] == 64 and rows["var"]["tokens_per_image"] == 85
    # raster AR and bare VAR: the same blocks without AdaLN; +AdaLN adds its projections; +depth doubles the blocks
    assert rows["raster_ar"]["non_embedding_params"] == rows["var"]["non_embedding_params"]
    assert rows["adaln"]["non_embedding_params"] > rows["var"]["non_embedding_params"]
    assert rows["depth"]["depth"] == 2 * rows["attn_norm"]["depth"] == 2
    assert {r["steps"] for r in rows.values()} == {5} and {r["training_images"] for r in rows.values()} == {40}
    # sampling-only rows reuse the previous row's model; each row's sampling is the models' own with its rows off
    assert rows["adaln"]["model"] == rows["top_k"]["model"] == rows["cfg"]["model"] == "adaln"
    assert rows["adaln"]["val_loss_last"] == rows["cfg"]["val_loss_last"]
    assert rows["var"]["sampling"] == rows["adaln"]["sampling"] == {"cfg": 0.0, "top_k": 0, "top_p": 0.0}
    assert rows["top_k"]["sampling"] == {"cfg": 0.0, "top_k": 50, "top_p": 0.75}
    assert rows["cfg"]["sampling"] == rows["depth"]["sampling"] == {"cfg": 2.0, "top_k": 50, "top_p": 0.75}
    for name, row in rows.items():
        assert row["val_loss_last"] < 6.0, name  # log(64) = 4.16 is chance; untrained logits start near it
        emoji = row["samples"]
        assert 0 <= emoji["class_accuracy"] <= 1 and emoji["feature_distance"] > 0 and emoji["per_class"] == 2
        assert emoji["calibration"] == rows["var"]["samples"]["calibration"]  # one reference set for all
        assert row["seconds_per_image_b1"] > 0
        assert (tmp_path / "seed3" / "rows" / f"{name}.png").is_file()
    for model in ("var", "adaln", "attn_norm", "depth"):
        assert (tmp_path / "seed3" / "next_scale" / model / "model.safetensors").is_file()
    assert len(list((tmp_path / "seed3").glob("*/tokenizer/model.safetensors"))) == 2  # one per tokenisation
    table = (tmp_path / "results.md").read_text()
    assert table == ablation_table(report["results"]) and "*blurred_8x8* (calibration)" in table
    assert table in capsys.readouterr().out

    # the pluggable metric, on the same trained models (finished stages are reused, not retrained)
    cfg.metric = f"{__name__}.nearest_mean_metric"
    ablation.run(cfg)
    rerun = json.loads((tmp_path / "results.json").read_text())["results"]["3"]
    for name, row in rerun.items():
        assert set(row["samples"]) == {"nearest_mean_accuracy", "mean_pixel"}
        assert 0 <= row["samples"]["nearest_mean_accuracy"] <= 1
        assert row["val_loss_last"] == rows[name]["val_loss_last"]
    assert "nearest_mean_accuracy (1 seeds)" in (tmp_path / "results.md").read_text()
