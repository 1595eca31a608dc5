"""The notebooks in notebooks/ (their models come from varlib.pipelines.notebook_models.prepare_models, tested in test_pipeline.py).

The slow tests execute each notebook with nbclient, each alone from a fresh project folder: a kernel running this
interpreter (a kernelspec written to a temporary folder), a temporary working directory, and ``VARLIB_PROJECT_DIR``
pointing at an empty temporary folder, so no ``make demo`` output is found, each notebook trains its own tiny
models there and nothing lands in the repository. The wall time of each notebook is recorded (``record_property``,
and printed under ``pytest -s``); it is not asserted, since other work on the machine slows it down.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

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
