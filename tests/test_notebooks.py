"""Every notebook in ``notebooks/`` runs top to bottom, and is committed clean.

The notebooks are executed with ``nbclient`` in quick mode (``MADAM_QUICK=1``,
which ``conftest.py`` sets and which is passed to the kernel explicitly), in a
kernel started from this interpreter (``sys.executable``), so the notebooks
see exactly the packages the tests see. Any cell error fails the test.

The kernel does *not* inherit the test suite's simulated 8-device
``XLA_FLAGS``: each notebook runs as a user would run it (the sharding notebook
requests its simulated devices itself).

Committed notebooks must carry no outputs and no execution counts; strip them
with ``python notebooks/strip_outputs.py``.
"""

import json
import os
import pathlib
import re
import sys
import time

import ipykernel  # noqa: F401  (the kernel the notebooks run in: fail, never skip)
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "madam-optax-test"
CELL_TIMEOUT_S = 600
EXPECTED = (
  "01_quickstart.ipynb",
  "02_learning_rate_robustness.ipynb",
  "03_lns_compressed_training.ipynb",
  "04_sharded_training.ipynb",
)


def notebook_ids():
  return [p.name for p in NOTEBOOKS]


def test_notebooks_exist():
  missing = [name for name in EXPECTED if not (NOTEBOOK_DIR / name).exists()]
  assert not missing, f"notebooks missing from notebooks/: {missing}"


def test_readme_links_every_notebook_with_a_colab_badge():
  readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
  colab = (
    "https://colab.research.google.com/github/madam-optax/madam-optax/"
    "blob/main/notebooks/"
  )
  for name in EXPECTED:
    assert f"({colab}{name})" in readme, (
      f"README: no Open in Colab badge for {name}"
    )


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernelspec that launches ``ipykernel`` with this very interpreter."""
  root = tmp_path_factory.mktemp("kernels")
  spec_dir = root / KERNEL_NAME
  spec_dir.mkdir()
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [
          sys.executable,
          "-m",
          "ipykernel_launcher",
          "-f",
          "{connection_file}",
        ],
        "display_name": "madam-optax tests",
        "language": "python",
      }
    )
  )
  return root


def kernel_env():
  env = dict(os.environ)
  env["MADAM_QUICK"] = "1"
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")
  ).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_notebook_runs_in_quick_mode(path, kernel_dir):
  nb = nbformat.read(path, as_version=4)
  km = KernelManager(
    kernel_name=KERNEL_NAME,
    kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
  )
  client = nbclient.NotebookClient(
    nb,
    km=km,
    timeout=CELL_TIMEOUT_S,
    allow_errors=False,
    resources={"metadata": {"path": str(path.parent)}},
  )
  start = time.perf_counter()
  client.execute(env=kernel_env())  # raises CellExecutionError on any error
  elapsed = time.perf_counter() - start
  print(f"{path.name}: executed in {elapsed:.1f} s (quick mode)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [
    i
    for i, cell in enumerate(nb.cells)
    if cell.cell_type == "code"
    and (cell.get("outputs") or cell.get("execution_count") is not None)
  ]
  assert not dirty, (
    f"{path.name}: code cells {dirty} carry outputs or execution counts; "
    "strip them with `python notebooks/strip_outputs.py`"
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_notebook_starts_with_description_install_and_quick_switch(path):
  cells = nbformat.read(path, as_version=4).cells
  assert cells[0].cell_type == "markdown", "first cell: what the notebook shows"
  install = cells[1].source
  assert cells[1].cell_type == "code" and "import madam_optax" in install
  assert "%pip install" in install and "except ImportError" in install
  sources = "\n".join(c.source for c in cells if c.cell_type == "code")
  assert 'QUICK = os.environ.get("MADAM_QUICK") == "1"' in sources
