"""Runs notebook 03 and saves its two pictures of one AdaPreLoRA step for the README.

  python docs/export_figures.py      # writes docs/step_matrices.png and docs/step_geometry.png

The pictures are drawn by the notebook, so the README shows exactly what the
notebook (run by the test suite) computes.
"""

import base64
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_compare_lora_optimizers.ipynb"
FIGURES = {  # the first line of the cell that draws it -> file name
    "panels = [": "step_matrices.png",
    "e1 = z / norm(z)": "step_geometry.png",
}


def main() -> None:
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  for cell in notebook.cells:
    name = next((f for start, f in FIGURES.items() if cell.source.startswith(start)), None)
    if name is None:
      continue
    png = next(o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {}))
    (ROOT / "docs" / name).write_bytes(base64.b64decode(png))
    print("wrote", ROOT / "docs" / name)


if __name__ == "__main__":
  main()
