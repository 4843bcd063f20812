"""The notebooks in notebooks/ run top to bottom, each in a fresh kernel of this environment.

A cell that raises fails the test with the cell and its traceback. The
notebooks carry their own checks (a restored optimizer state steps like the
original, sharded training matches unsharded), so running them checks those
too. The kernel is this interpreter (``sys.executable``), never a ``python3``
kernelspec found elsewhere on the machine.
"""

import json
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # each notebook runs in its own kernel

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 600


def _kernel_manager(folder: pathlib.Path) -> KernelManager:
  """A manager for an ipykernel on ``sys.executable``, from a kernelspec written to ``folder``."""
  spec = folder / "kernels" / "this-python"
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(
      json.dumps({"argv": argv, "display_name": "tests", "language": "python"})
  )
  specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
  return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


def test_the_notebooks_are_there():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [
      "01_quickstart.ipynb",
      "02_finetune_flax_lora.ipynb",
      "03_compare_lora_optimizers.ipynb",
      "04_sharded_training.ipynb",
  ]


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = NotebookClient(
      notebook,
      km=_kernel_manager(tmp_path),
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOKS)}},  # run where Jupyter would
  )
  client.execute()  # raises CellExecutionError, naming the cell, if one fails
