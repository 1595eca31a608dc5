"""Every experiment config composes with the train root config, resolves, and names importable targets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from varlib.cli.common import compose_config

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
