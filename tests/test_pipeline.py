"""varlib.pipelines (the stages of varlib-demo, varlib-demo-text, varlib-ablation, varlib-scaling and the notebooks) and
those commands: when a stage counts as done, where a run's files lie, both demos end to end at a tiny size, and each
command's --help."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from helpers.commands import run_in_process
from helpers.runs import untrained_validation

import varlib
from varlib.cli import demo, demo_text, scaling
from varlib.configs import compose_config, datamodule_config
from varlib.evaluation.scaling import SCALING_RECORD_FILENAME, ScalingRecord, write_scaling_record
from varlib.evaluation.emoji_classifier import halfway_progress
from varlib.images import image_grid
from varlib.pipelines import stages
from varlib.pipelines.notebook_models import prepare_models
from varlib.pipelines.scaling_sweep import fit_sweep
from varlib.pipelines.stages import PROJECT_DIR_VARIABLE, RunFiles, project_dir, stage_done, tokenize_stage, train_stage

REPO = Path(__file__).resolve().parents[1]


# -- what counts as done -----------------------------------------------------------------------------------------


def test_a_training_stage_is_done_once_its_metrics_follow_its_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "train_experiment",
                        lambda experiment, out_dir, overrides: calls.append((experiment, out_dir, overrides)) or {})
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not stage_done(tmp_path)  # killed between the export and metrics.json: train (resume) again
    train_stage("var_emoji", tmp_path, ["seed=1"])
    assert calls == [("var_emoji", tmp_path, ["seed=1"])]

    (tmp_path / "metrics.json").write_text(json.dumps({"val/loss_avg": 4.0}))
    assert stage_done(tmp_path)
    assert train_stage("var_emoji", tmp_path, ["seed=1"]) == {"val/loss_avg": 4.0}
    assert len(calls) == 1  # reused, not retrained


def test_a_token_cache_is_done_once_its_index_lists_both_splits(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stages, "tokenize_dataset", lambda cfg: calls.append([cfg.tokenizer, cfg.out_dir]))
    cache = tmp_path / "token_cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"splits": {"train": ["train-00000.safetensors"]}}))
    assert not stage_done(cache)  # interrupted before the val split
    tokenize_stage(tmp_path / "tok.safetensors", cache)
    assert calls == [[str(tmp_path / "tok.safetensors"), str(cache)]]
    (cache / "index.json").write_text(json.dumps({"splits": {"train": [], "val": []}}))
    assert stage_done(cache)
    tokenize_stage(tmp_path / "tok.safetensors", cache)
    assert len(calls) == 1


def test_transformer_data_comes_from_a_finished_token_cache_else_from_images(tmp_path):
    files = RunFiles(tmp_path, "tiny")
    files.tokenizer.parent.mkdir(parents=True)
    vae = varlib.MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 4))
    varlib.save_tokenizer(vae, files.tokenizer)

    files.token_cache.mkdir()
    (files.token_cache / "index.json").write_text(json.dumps({"splits": {"train": ["train-00000.safetensors"]}}))
    images = compose_config("train", ["experiment=var_emoji", f"paths.output_dir={tmp_path}",
                                      *files.transformer_data_overrides()])
    assert images.data._target_ == "varlib.data.EmojiDataModule" and "root" not in images.data
    assert images.data.image_size == vae.image_size == 16
    image_data = instantiate(datamodule_config(images.data))  # no token-cache-only key left
    assert image_data.image_size == 16 and image_data.class_balance == 1.0  # var_emoji's balance reaches the images
    assert images.model.tokenizer_path == str(files.tokenizer)

    (files.token_cache / "index.json").write_text(json.dumps({"splits": {"train": [], "val": []}}))
    cached = compose_config("train", ["experiment=var_emoji", f"paths.output_dir={tmp_path}",
                                      *files.transformer_data_overrides()])
    assert cached.data._target_ == "varlib.data.token_cache.TokenCacheDataModule"
    assert cached.data.root == str(files.token_cache)


# -- the notebooks' models ---------------------------------------------------------------------------------------


def test_project_dir_is_the_repository_unless_the_variable_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(PROJECT_DIR_VARIABLE, raising=False)
    assert project_dir() == REPO
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(tmp_path))
    assert project_dir() == tmp_path


def test_project_dir_of_an_installed_package_is_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(PROJECT_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(varlib, "__file__", str(tmp_path / "lib" / "site-packages" / "varlib" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert project_dir() == tmp_path


def test_prepare_models_uses_the_demo_files_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(tmp_path))
    demo_files = RunFiles(tmp_path / "outputs" / "demo", "demo")
    demo_files.tokenizer.parent.mkdir(parents=True)
    demo_files.tokenizer.write_bytes(b"")
    # A tokenizer is enough for a scaling sweep; the quickstart also needs the VAR.
    assert prepare_models(with_var=False) == demo_files
    demo_files.transformer.parent.mkdir(parents=True)
    demo_files.transformer.write_bytes(b"")
    assert prepare_models() == demo_files
    assert not (tmp_path / "outputs" / "notebooks").exists()


# -- the commands ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, config, line", [
    ("varlib-demo", "demo", "scored_per_class: 50           # samples per class that the emoji classifier scores"),
    ("varlib-demo-text", "demo_text", "colour_per_prompt: 8           # samples per colour-test prompt"),
    ("varlib-ablation", "ablation", "token_cache: true              # false: tokenise on the fly while training"),
    ("varlib-scaling", "scaling", "skip_fraction: 0.0             # leave each run's first fraction of training"),
])
def test_help_prints_the_commands_own_commented_config(command, config, line):
    # The module behind the script (test_packaging checks that each script is its module's main): an environment
    # installed before a command was added lacks its script until reinstalled.
    completed = run_in_process([sys.executable, "-m", f"varlib.cli.{config}", "--help"], REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (REPO / "conf" / f"{config}.yaml").read_text() in completed.stdout  # every key with its comment
    assert line in completed.stdout
    assert "Powered by Hydra" not in completed.stdout


def sweep_record(depth: int) -> ScalingRecord:
    """A run whose four metrics fall as power laws of compute, lower for deeper runs."""
    params = 1e6 * depth**3
    compute = np.array([1e15, 2e15, 4e15, 8e15]) * params / 1e8
    loss = 50 * compute**-0.05 * (1 + 1 / depth)
    return ScalingRecord(f"d{depth}", depth, params, compute,
                         {"loss_avg": loss, "loss_last": 1.1 * loss, "err_avg": 0.9 * loss, "err_last": loss})


def test_scaling_command_fits_the_sweep_it_is_given(tmp_path, capsys):
    for depth in (2, 4, 6):
        write_scaling_record(tmp_path / "sweep" / f"d{depth}" / SCALING_RECORD_FILENAME, sweep_record(depth))
    fits = scaling.run(compose_config("scaling", [f"sources={tmp_path / 'sweep'}", f"out_dir={tmp_path / 'out'}",
                                                  "skip_fraction=0.5"]))
    assert fits == fit_sweep([tmp_path / "sweep"], skip_fraction=0.5)
    assert json.loads((tmp_path / "out" / "fits.json").read_text())["skip_fraction"] == 0.5
    assert f"{'N/loss_last':14s} alpha={fits['N/loss_last']['alpha']:+.4f}" in capsys.readouterr().out
    listed = scaling.run(compose_config("scaling", [f"sources=[{tmp_path / 'sweep' / 'd2'},{tmp_path / 'sweep' / 'd6'}]"]))
    assert listed == fit_sweep([tmp_path / "sweep" / "d2", tmp_path / "sweep" / "d6"])


@pytest.mark.slow
def test_tiny_demo_writes_samples_and_figures_and_reuses_its_stages(tmp_path):
    overrides = [f"out_dir={tmp_path}", "per_class=2", "scored_per_class=3",
                 'tokenizer.overrides=["trainer.max_steps=3","model.vae.ch=16","cpu_threads=1"]',
                 'var.overrides=["trainer.max_steps=3","trainer.val_check_interval=3","cpu_threads=1"]']
    metrics = demo.run(compose_config("demo", overrides))
    assert (tmp_path / "samples.png").is_file()
    # both stages against their untrained selves (same configs and seed 0; measured: +1.1 dB, loss_avg -0.44)
    before = untrained_validation(["experiment=demo_tokenizer", "seed=0", "trainer.max_steps=3", "model.vae.ch=16",
                                   "cpu_threads=1"])
    assert metrics["psnr"] > before["val/psnr"] + 0.5, (before["val/psnr"], metrics["psnr"])
    before = untrained_validation(["experiment=var_emoji", "seed=0", f"data.root={tmp_path / 'token_cache'}",
                                   f"model.tokenizer_path={tmp_path / 'tokenizer' / 'model.safetensors'}",
                                   "trainer.max_steps=3", "trainer.val_check_interval=3", "cpu_threads=1"])
    assert metrics["loss_avg"] < before["val/loss_avg"] - 0.2, (before["val/loss_avg"], metrics["loss_avg"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    emoji = metrics["emoji_classifier"]
    assert emoji["per_class"] == 3 and set(emoji["calibration"]) == {"real", "blurred_8x8", "noise"}
    assert 0.0 <= emoji["class_accuracy"] <= 1.0 and emoji["feature_distance"] >= 0.0
    assert emoji["halfway_progress"] == pytest.approx(halfway_progress(emoji, emoji["calibration"]), nan_ok=True)
    assert set(metrics["seconds"]) == {"tokenizer", "tokenize", "var", "sample", "score", "total"}
    files = RunFiles(tmp_path, "demo")
    assert stage_done(files.tokenizer.parent) and stage_done(files.token_cache) and stage_done(files.transformer.parent)

    # Run again: every stage is done, so nothing trains, and sampling and scoring give the same figures.
    trained = {path: path.stat().st_mtime_ns for path in (files.tokenizer, files.transformer)}
    again = demo.run(compose_config("demo", overrides))
    assert {path: path.stat().st_mtime_ns for path in trained} == trained
    assert again["emoji_classifier"] == emoji and again["loss_avg"] == metrics["loss_avg"]
    assert again["seconds"]["tokenizer"] < 1.0 and again["seconds"]["var"] < 1.0


@pytest.mark.slow
def test_tiny_text_demo_writes_samples_and_every_figure_and_repeats_them(tmp_path):
    overrides = [f"out_dir={tmp_path / 'text'}", f"demo_dir={tmp_path / 'demo'}", "prompts=[red heart, pizza]",
                 "per_prompt=2", "scored_per_class=3", "colour_per_prompt=1",
                 'tokenizer.overrides=["trainer.max_steps=3","model.vae.ch=16","cpu_threads=1"]',
                 'var.overrides=["trainer.max_steps=3","trainer.val_check_interval=3","cpu_threads=1"]']
    metrics = demo_text.run(compose_config("demo_text", overrides))
    assert json.loads((tmp_path / "text" / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"loss_avg", "loss_last", "err_avg", "err_last", "sampling", "emoji_classifier",
                            "colour_test", "rows", "seconds", "checkpoints"}
    assert metrics["rows"] == ["red heart", "pizza"]
    grid = image_grid(torch.zeros(4, 3, 32, 32), columns=2)  # two prompts' rows of two 32 px samples
    assert Image.open(tmp_path / "text" / "samples.png").size == (grid.shape[2], grid.shape[1])
    assert metrics["sampling"]["no_guidance"]["cfg"] == 0.0 and metrics["sampling"]["model"]["cfg"] > 0.0
    for setting in ("model", "no_guidance"):
        emoji = metrics["emoji_classifier"][setting]
        assert emoji["per_class"] == 3 and set(emoji["calibration"]) == {"real", "blurred_8x8", "noise"}
        assert 0.0 <= emoji["class_accuracy"] <= 1.0 and emoji["feature_distance"] >= 0.0
        assert 0.0 <= metrics["colour_test"][setting] <= 1.0
    colour = metrics["colour_test"]
    assert colour["real_emoji"] == 1.0 and colour["per_prompt"] == 1 and len(colour["prompts"]) == 21
    assert set(metrics["seconds"]) == {"tokenizer", "tokenize", "var", "sample", "score", "total"}
    assert stage_done(tmp_path / "demo" / "tokenizer") and stage_done(tmp_path / "text" / "token_cache")

    # Again: every stage is reused and the seeded sampling gives the same figures.
    again = demo_text.run(compose_config("demo_text", overrides))
    assert again["emoji_classifier"] == metrics["emoji_classifier"]
    assert again["colour_test"] == metrics["colour_test"] and again["seconds"]["var"] < 1.0
