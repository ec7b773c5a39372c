"""Strips outputs and execution counts from notebooks, in place.

Usage (from the repository root)::

  python notebooks/strip_outputs.py                 # every notebook in notebooks/
  python notebooks/strip_outputs.py path/to/a.ipynb  # just these

Notebooks are committed without outputs (``tests/test_notebooks.py`` checks).
"""

import pathlib
import sys

import nbformat


def strip(path: pathlib.Path) -> bool:
  """Removes outputs, execution counts and run metadata; True if changed."""
  nb = nbformat.read(path, as_version=4)
  changed = False
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    if cell.outputs or cell.execution_count is not None:
      cell.outputs, cell.execution_count = [], None
      changed = True
    if "execution" in cell.metadata:
      del cell.metadata["execution"]
      changed = True
  # Execution fills in the interpreter's details; keep only the language.
  if nb.metadata.get("language_info", {}) != {"name": "python"}:
    nb.metadata["language_info"] = {"name": "python"}
    changed = True
  if changed:
    nbformat.write(nb, path)
  return changed


def main(argv: list[str]) -> None:
  paths = ([pathlib.Path(a) for a in argv] if argv
           else sorted(pathlib.Path(__file__).resolve().parent.glob("*.ipynb")))
  for path in paths:
    print(f"{path}: {'stripped' if strip(path) else 'clean'}")


if __name__ == "__main__":
  main(sys.argv[1:])
