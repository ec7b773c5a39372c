"""Loading the benchmark scripts and their shared harness.

``benchmarks/`` is a folder of scripts, not a package: ``python
benchmarks/step_time.py`` puts that folder on ``sys.path``, which is how each
script imports ``_harness``. The tests do the same (the folder goes on
``sys.path`` once) and import a script by its file name, so a script and the
harness it imports are one module each, as when the script runs.
"""

import importlib
import pathlib
import sys
from types import ModuleType

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
  """The module ``benchmarks/<name>.py`` (e.g. ``"step_time"``, ``"_harness"``)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  module = importlib.import_module(name)
  assert pathlib.Path(module.__file__).parent == BENCHMARKS, module.__file__
  return module


@pytest.fixture(scope="session")
def benchmark():
  """``benchmark(name)`` loads ``benchmarks/<name>.py``."""
  return load_benchmark


@pytest.fixture(scope="session")
def harness():
  return load_benchmark("_harness")
