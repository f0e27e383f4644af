"""Every notebook runs top to bottom in a Jupyter kernel, as a user runs it (so the notebooks
cannot rot), and notebooks are committed without outputs."""

import json
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_documented_notebooks_are_there():
  names = {p.name for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "tpu_training.ipynb", "export_to_pytorch.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
  for cell in json.loads(path.read_text())["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  """Executed with nbclient in the `python3` kernel of this environment, from the repository
  root; the kernel inherits the tests' environment (8 fake CPU devices). A failing cell raises
  `CellExecutionError` with its traceback."""
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert outputs and not any(o.output_type == "error" for o in outputs), path.name
