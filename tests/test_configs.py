"""Every experiment config composes with the train root config, resolves, and names importable targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from varlib.configs import compose_config

EXPERIMENTS = sorted(path.stem for path in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


def targets(node) -> list[str]:
    """Every ``_target_`` value in a resolved config tree."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [target for value in node.values() for target in targets(value)]
    if isinstance(node, list):
        return [target for value in node for target in targets(value)]
    return []


def test_experiment_list_is_not_empty():
    assert {"tokenizer_emoji", "var_emoji", "var_d16_imagenet256"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_resolves_and_names_importable_targets(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.task_name == experiment
    resolved = OmegaConf.to_container(cfg, resolve=True)
    found = targets(resolved)
    assert {"model", "data", "trainer"} <= set(resolved)
    assert len(found) >= 3  # at least data, model and trainer are built by instantiate
    for target in found:
        assert get_object(target) is not None, target


@pytest.mark.parametrize("experiment", ["demo_tokenizer", "var_emoji", "ar_emoji"])
def test_the_run_seed_seeds_the_model_steps_and_the_data_order(experiment):
    for seed in (0, 7):
        cfg = compose_config("train", [f"experiment={experiment}", f"seed={seed}"])
        assert (cfg.model.seed, cfg.data.shuffle_seed) == (seed, seed)
    assert compose_config("train", ["experiment=var_emoji", "seed=7", "data.shuffle_seed=2"]).data.shuffle_seed == 2


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_the_scaling_sweep_ties_width_and_heads_to_the_depth(depth):
    cfg = compose_config("train", ["experiment=var_emoji_scaling", f"model.var.depth={depth}"])
    assert (cfg.model.var.width, cfg.model.var.num_heads) == (32 * depth, depth)
    assert compose_config("train", ["experiment=var_emoji_scaling", "model.var.width=48"]).model.var.width == 48


def test_optimizer_and_discriminator_swap_from_the_command_line(tmp_path):
    from helpers.discriminators import GlobalDiscriminator

    overrides = ["experiment=tokenizer_emoji", f"paths.output_dir={tmp_path}", "model.optimizer._target_=torch.optim.Adam",
                 "model.loss.disc_weight=0.5", "model.discriminator._target_=helpers.discriminators.GlobalDiscriminator",
                 "~model.discriminator.base_channels", "~model.discriminator.n_layers", "~model.discriminator.norm",
                 "+model.discriminator.width=6"]
    module = instantiate(compose_config("train", overrides).model)  # as varlib.training.runner builds it
    assert isinstance(module.discriminator, GlobalDiscriminator) and module.discriminator.conv.out_channels == 6
    optimizers = module.configure_optimizers()
    assert [type(o) for o in optimizers] == [torch.optim.Adam, torch.optim.Adam]
    assert optimizers[0].defaults["betas"] == (0.9, 0.9)  # the experiment's betas reach the swapped class
    assert module.hparams["optimizer"] == {"_target_": "torch.optim.Adam", "betas": [0.9, 0.9]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_model_spells_its_optim_settings_alike(experiment):
    """One spelling and meaning: ``model.optim.lr`` is the peak lr of every model, and ``grad_clip: null`` is off."""
    from varlib.training.settings import OptimConfig, RecipeOptimConfig, build_config

    model = OmegaConf.to_container(compose_config("train", [f"experiment={experiment}"]).model, resolve=True)
    assert "lr" in model["optim"] and "base_lr" not in model["optim"]
    config_class = OptimConfig if "vae" in model else RecipeOptimConfig
    settings = build_config(config_class, {**model["optim"], "grad_clip": None}, "model.optim")
    assert settings.grad_clip is None and settings.lr == model["optim"]["lr"] > 0


def test_the_raster_ar_experiment_is_var_emoji_on_another_tokenizer():
    """ar_emoji extends var_emoji: the network under the same key (model.var), the same shape, recipe, sampling,
    data and steps; only the model class, tokenizer, token cache and name differ."""
    var, ar = ({"model": OmegaConf.to_container(config.model, resolve=True),
                "data": OmegaConf.to_container(config.data, resolve=True),
                "trainer": OmegaConf.to_container(config.trainer)}  # resolved by Hydra at run time (paths)
               for config in (compose_config("train", [f"experiment={name}"]) for name in ("var_emoji", "ar_emoji")))
    assert ar["model"]["_target_"].endswith("RasterARModule") and var["model"]["_target_"].endswith("VARModule")
    shared = ("depth", "num_classes", "width", "num_heads", "drop_path_rate", "init_adaln_gamma", "cond_drop_rate")
    assert {k: ar["model"]["var"][k] for k in shared} == {k: var["model"]["var"][k] for k in shared}
    for key in ("optim", "optimizer", "ema_decay", "grid_classes"):
        assert ar["model"][key] == var["model"][key], key
    # the same sampling; the fast options are next-scale ones, which var_emoji leaves off (exact)
    assert {k: var["model"]["sampling"][k] for k in ar["model"]["sampling"]} == ar["model"]["sampling"]
    assert {k: var["model"]["sampling"][k] for k in ("cfg_until", "prune", "stop_after")} == dict.fromkeys(
        ("cfg_until", "prune", "stop_after"))
    assert ar["trainer"] == var["trainer"]
    assert {k: v for k, v in ar["data"].items() if k != "root"} == {k: v for k, v in var["data"].items() if k != "root"}
    assert ar["data"]["root"] != var["data"]["root"] and ar["model"]["tokenizer_path"] != var["model"]["tokenizer_path"]


def test_the_512px_experiment_is_the_official_d36_recipe():
    from varlib import VAR, MultiScaleVQVAE, VARConfig
    from varlib.models.patch_schedules import PATCH_NUMS_512

    cfg = compose_config("train", ["experiment=var_d36_imagenet512"])
    var = OmegaConf.to_container(cfg.model.var)
    assert (var["depth"], var["shared_aln"], tuple(var["patch_nums"])) == (36, True, PATCH_NUMS_512)
    assert var["init_adaln_gamma"] == 5e-6 and var["adaln"] and var["attn_l2_norm"]
    assert cfg.data.global_batch_size == 768 and cfg.model.optim.lr == pytest.approx(8e-5 * 768 / 256)
    assert cfg.model.optim.weight_decay_end == 0.08 and cfg.trainer.max_steps == 350 * (1_281_167 // 768)
    with torch.device("meta"):  # the shape the configuration builds: VAR-d36-s, 2,353,893,904 parameters
        model = VAR(MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=160), VARConfig(**var))
    assert sum(p.numel() for p in model.parameters()) == 2_353_893_904 and model.L == 2240
