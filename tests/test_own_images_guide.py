"""The README's "Your own images" commands run as written on a tiny class-folder dataset: only step and sample
counts are added, the official files are tiny official-format stand-ins at the same names (in $VARLIB_WEIGHTS),
and varlib-evaluate's Inception (weights absent offline) is the tests' small extractor. Each command runs through
the Hydra entry point its console script calls, in the test's process (:mod:`helpers.commands`)."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.commands import run_in_process
from helpers.hub import switch_hub_off

import varlib

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
#: appended to each command: the step and sample counts, nothing else
SHORT = {
    "varlib-train": ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                     "data.batch_size=2", "data.num_workers=0"],
    "varlib-tokenize": ["data.num_workers=0"],
    "varlib-sample": [],
    "varlib-evaluate": ["num_per_class=4", "batch_size=12", "~inception", "+inception._target_=helpers.extractors.TinyExtractor"],
}


def guide_commands() -> list[str]:
    """The command lines of the README section's block (continuations joined, comments dropped): a dry-run block
    for tests/test_readme.py, since it needs the user's images, the official weights and Inception's; here it runs."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash dry-run\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = np.zeros((256, 256, 3), np.uint8)
                image[..., c] = 200
                image[64:192, 64:192] = rng.integers(0, 255, 3)
                Image.fromarray(image).save(folder / f"{i}.png")


@pytest.mark.slow
def test_your_own_images_commands_run_as_written(tmp_path, monkeypatch):
    from conftest import load_bundle

    bundle = load_bundle("tiny10")  # official format at the official 256px schedule
    weights = tmp_path / "weights" / "FoundationVision" / "var"
    weights.mkdir(parents=True)
    torch.save(bundle["vqvae_state_dict"], weights / "vae_ch160v4096z32.pth")
    torch.save(bundle["var_state_dict"], weights / "var_d16.pth")
    make_folder(tmp_path / "my_images")
    monkeypatch.setenv("VARLIB_WEIGHTS", str(tmp_path / "weights"))
    switch_hub_off(monkeypatch)  # no download
    commands = guide_commands()
    assert [c.split()[0] for c in commands] == ["varlib-train", "varlib-tokenize", "varlib-train", "varlib-train",
                                                "varlib-sample", "varlib-evaluate"]
    for command in commands:
        # the from-scratch comparison at d16 is 300M parameters: two steps of it at width 64 keep the test short
        words = shlex.split(command)
        if "experiment=var_emoji" in words:
            words = [w for w in words if not w.startswith(("model.var.depth", "model.var.width", "model.var.num_heads"))]
            words += ["model.var.depth=2", "model.var.width=64", "model.var.num_heads=2"]
        done = run_in_process([*words, *SHORT[words[0]]], tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    var = varlib.load(tmp_path / "outputs" / "my_var" / "model.safetensors")
    assert var.num_classes == 3 and var.class_names == CLASSES
    assert var.depth == 2 and var.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    tokenizer = varlib.load(tmp_path / "outputs" / "my_tokenizer" / "model.safetensors")
    official = varlib.load(weights / "vae_ch160v4096z32.pth")
    trained = dict(tokenizer.named_parameters())
    for name, value in official.named_parameters():  # only the decoder side trained
        same = torch.equal(trained[name], value)
        assert same != name.startswith(("decoder.", "post_quant_conv.")), name
    grid = sorted((tmp_path / "outputs" / "my_samples").glob("*_class*.png"))
    assert [p.name.split("_class")[1] for p in grid] == ["0.png", "2.png"]
    assert (tmp_path / "outputs" / "my_eval" / "metrics.json").is_file()
