"""The notebooks in notebooks/ (their models come from varlib.pipelines.notebook_models.prepare_models, tested in test_pipeline.py).

The slow tests execute each notebook with nbclient: a kernel running this interpreter (a kernelspec written to a
temporary folder), a temporary working directory each, and ``VARLIB_PROJECT_DIR`` pointing at one temporary project
folder that starts empty, so no ``make demo`` output is found and nothing lands in the repository. The notebooks
share that folder as a user's notebooks share a checkout, and so do the pytest workers: the first test to need it
trains the tiny class and text models there with the notebooks' own ``prepare_models`` and ``prepare_text_model``
(once per run, under a file lock); each notebook reuses them and trains what only it needs (the scaling sweep, the
ablation's rows). The wall time of each notebook is recorded (``record_property``, and printed under
``pytest -s``); it is not asserted, since other work on the machine slows it down.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from varlib.pipelines.notebook_models import prepare_models, prepare_text_model
from varlib.pipelines.stages import PROJECT_DIR_VARIABLE

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_quickstart.ipynb", "02_zero_shot_editing.ipynb", "03_scaling_laws.ipynb",
             "04_next_scale_vs_next_token.ipynb", "05_text_to_image.ipynb"]
# What each notebook's tiny run leaves in the temporary project folder.
TINY_OUTPUT = {"04_next_scale_vs_next_token.ipynb": "ablation/results.json",
               "05_text_to_image.ipynb": "text_var/model.safetensors"}
KERNEL_NAME = "varlib-notebook-test"


# -- the notebooks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A Jupyter data folder with a kernelspec that starts this interpreter (sys.executable)."""
    kernelspec = pytest.importorskip("ipykernel.kernelspec")
    prefix = tmp_path_factory.mktemp("jupyter")
    kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    return prefix / "share" / "jupyter"


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The run's project folder, holding the notebooks' tiny models (see the module docstring)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's folder lies in the run's, which every worker sees
        root = root.parent
    project = root / "notebook_project"
    with FileLock(root / "notebook_project.lock"), pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROJECT_DIR_VARIABLE, str(project))
        assert prepare_models().kind == "tiny"
        prepare_text_model()
    return project


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_shows_pictures(name, kernel_path, project, tmp_path, monkeypatch, record_property):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv(PROJECT_DIR_VARIABLE, str(project))
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    stored_outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code" and cell.outputs]
    assert not stored_outputs, f"{name} is stored with outputs; clear them"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name=KERNEL_NAME,
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
    assert (project / "outputs" / "notebooks" / expected).is_file()
    assert not any(workdir.iterdir())
