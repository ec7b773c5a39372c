"""Smoke test of ``benchmarks/scaling.py`` in-process, on 2 of the 8
simulated devices of ``conftest.py`` (the script's own subprocesses are not
started here)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
  spec = importlib.util.spec_from_file_location("scaling", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fsdp_row_halves_memory_and_renders(scaling, eight_devices):
  row = scaling.measure("fsdp", 2, dict(scaling.QUICK, steps=1),
                        devices=eight_devices)
  assert row["mesh"] == {"data": 1, "fsdp": 2}
  assert row["param_bytes_per_device"] * 2 == row["param_bytes_total"]
  # Optimizer state: half of every tensor, plus the replicated scalars.
  half = row["opt_state_bytes_total"] / 2
  assert half <= row["opt_state_bytes_per_device"] < half + 1024
  assert row["collectives_optimizer_update"] == []
  assert row["train_step"]["median_ms"] > 0
  results = {"machine": scaling.machine_info(), "platform": "cpu",
             "sizes": dict(scaling.QUICK, steps=1), "command": "test",
             "rows": [row]}
  for key in ("cpu", "cores", "jax", "optax", "flax", "date"):
    assert results["machine"][key]
  table = scaling.markdown(results)
  assert "| 2 | fsdp |" in table and "simulated" in table
