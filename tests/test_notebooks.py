"""The notebooks in notebooks/ and their helper module varlib.notebook.

The slow tests execute each notebook with nbclient, each alone from a fresh project folder: a kernel running this
interpreter (a kernelspec written to a temporary folder), a temporary working directory, and ``VARLIB_PROJECT_DIR``
pointing at an empty temporary folder, so no ``make demo`` output is found, each notebook trains its own tiny
models there and nothing lands in the repository. The wall time of each notebook is recorded (``record_property``,
and printed under ``pytest -s``); it is not asserted, since other work on the machine slows it down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

import varlib
from varlib.configs import compose_config, datamodule_config
from varlib.notebook import PROJECT_DIR_VARIABLE, ModelFiles, prepare_models, project_dir

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_quickstart.ipynb", "02_zero_shot_editing.ipynb", "03_scaling_laws.ipynb",
             "04_next_scale_vs_next_token.ipynb"]
# What each notebook's tiny run leaves in the temporary project folder.
TINY_OUTPUT = {"04_next_scale_vs_next_token.ipynb": "ablation/results.json"}
KERNEL_NAME = "varlib-notebook-test"


# -- varlib.notebook -------------------------------------------------------------------------------------------


def test_project_dir_is_the_repository_unless_the_variable_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(PROJECT_DIR_VARIABLE, raising=False)
    assert project_dir() == REPO
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(tmp_path))
    assert project_dir() == tmp_path


def test_project_dir_of_an_installed_package_is_the_current_directory(tmp_path, monkeypatch):
    import varlib

    monkeypatch.delenv(PROJECT_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(varlib, "__file__", str(tmp_path / "lib" / "site-packages" / "varlib" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert project_dir() == tmp_path


def test_prepare_models_uses_the_demo_files_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(tmp_path))
    demo = ModelFiles(tmp_path / "outputs" / "demo", "demo")
    demo.tokenizer.parent.mkdir(parents=True)
    demo.tokenizer.write_bytes(b"")
    # A tokenizer is enough for a scaling sweep; the quickstart also needs the VAR.
    assert prepare_models(with_var=False) == demo
    demo.var.parent.mkdir(parents=True)
    demo.var.write_bytes(b"")
    assert prepare_models() == demo
    assert not (tmp_path / "outputs" / "notebooks").exists()


def test_var_data_comes_from_a_finished_token_cache_else_from_images(tmp_path):
    files = ModelFiles(tmp_path, "tiny")
    files.tokenizer.parent.mkdir(parents=True)
    vae = varlib.MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 4))
    varlib.save_tokenizer(vae, files.tokenizer)

    files.token_cache.mkdir()
    (files.token_cache / "index.json").write_text(json.dumps({"splits": {"train": ["train-00000.safetensors"]}}))
    assert not files.has_token_cache()  # interrupted before the val split: tokenise on the fly instead
    images = compose_config("train", ["experiment=var_emoji", f"paths.output_dir={tmp_path}",
                                      *files.var_data_overrides()])
    assert images.data._target_ == "varlib.data.EmojiDataModule" and "root" not in images.data
    assert images.data.image_size == vae.image_size == 16
    image_data = instantiate(datamodule_config(images.data))  # no token-cache-only key left
    assert image_data.image_size == 16 and image_data.class_balance == 1.0  # var_emoji's balance reaches the images
    assert images.model.tokenizer_path == str(files.tokenizer)

    (files.token_cache / "index.json").write_text(json.dumps({"splits": {"train": [], "val": []}}))
    assert files.has_token_cache()
    cached = compose_config("train", ["experiment=var_emoji", f"paths.output_dir={tmp_path}",
                                      *files.var_data_overrides()])
    assert cached.data._target_ == "varlib.data.token_cache.TokenCacheDataModule"
    assert cached.data.root == str(files.token_cache)


# -- the notebooks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A Jupyter data folder with a kernelspec that starts this interpreter (sys.executable)."""
    kernelspec = pytest.importorskip("ipykernel.kernelspec")
    prefix = tmp_path_factory.mktemp("jupyter")
    kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    return prefix / "share" / "jupyter"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_alone_and_shows_pictures(name, kernel_path, tmp_path, monkeypatch, record_property):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(tmp_path / "project"))
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    stored_outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code" and cell.outputs]
    assert not stored_outputs, f"{name} is stored with outputs; clear them"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(workdir)}})

    start = time.perf_counter()
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.0f} s")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert [output for output in outputs if "image/png" in output.get("data", {})], f"{name} showed no picture"
    # The tiny models went to the temporary project folder, not to the repository or the working directory.
    expected = TINY_OUTPUT.get(name, "tokenizer/model.safetensors")
    assert (tmp_path / "project" / "outputs" / "notebooks" / expected).is_file()
    assert not any(workdir.iterdir())
