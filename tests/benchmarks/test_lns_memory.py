"""Training memory of LNS-Madam, measured from the arrays (benchmarks/lns_memory.py).

The figures are exact byte counts, so the test pins them: if a storage dtype
regressed (codes widened to int32, the bf16 second moment kept in float32,
weights kept in float alongside the codes), a bytes-per-weight figure changes.
"""

import json

import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def lns_memory(benchmark):
  return benchmark("lns_memory")


def test_bytes_per_weight_are_exact(lns_memory, harness):
  params = harness.mlp_params((64, 128, 10))
  rows = {r["config"]: r for r in lns_memory.measure(params)}
  # code + state entries of each weight-matrix element.
  expected = {
    "lns_madam int8 + bf16 v": (3.0, ["bfloat16", "int8"]),
    "lns_madam int8 + fp32 v": (5.0, ["float32", "int8"]),
    "lns_madam int16 + fp32 v": (6.0, ["float32", "int16"]),
    "madam fp32": (8.0, ["float32"]),
    "adam fp32": (12.0, ["float32"]),
  }
  for name, (per_weight, dtypes) in expected.items():
    assert rows[name]["bytes_per_weight"] == per_weight, rows[name]
    assert rows[name]["weight_dtypes"] == dtypes, rows[name]
  assert 12.0 <= rows["adam fp32"]["bytes_per_param"] < 12.001  # + count
  # Whole model, biases (Adam, 12 B) and per-tensor scalars included.
  n = 64 * 128 + 128 + 128 * 10 + 10
  n_b = 128 + 10
  lns8 = rows["lns_madam int8 + bf16 v"]
  overhead = lns8["weights"] + lns8["state"] - 3 * (n - n_b) - 12 * n_b
  assert 0 < overhead <= 64, overhead  # scales, counts and the PRNG key
  assert lns8["bytes_per_param"] <= 3.2


def test_large_model_meets_three_bytes(lns_memory):
  # Weight matrices only (no biases): 8-bit LNS-Madam with a bf16 second
  # moment needs 3 bytes per parameter, up to a few per-tensor scalars.
  params = {"w1": jnp.ones((256, 512)) * 0.1, "w2": -jnp.ones((512, 256)) * 0.1}
  rows = {r["config"]: r for r in lns_memory.measure(params)}
  assert rows["lns_madam int8 + bf16 v"]["bytes_per_param"] < 3.001
  assert 12.0 <= rows["adam fp32"]["bytes_per_param"] < 12.001  # + count


def test_quick_main_writes_tables(lns_memory, harness, tmp_path):
  results = lns_memory.main(
    ["--quick", "--out", str(tmp_path)], log=lambda *_: None
  )
  md = (tmp_path / "lns_memory.md").read_text()
  assert "| lns_madam int8 + bf16 v |" in md and "| adam fp32 |" in md
  assert "## digits MLP 64-128-10 (9610 parameters)" in md
  data = json.loads((tmp_path / "lns_memory.json").read_text())
  assert tuple(data["machine"]) == harness.MACHINE_KEYS
  assert data["results"] == json.loads(json.dumps(results["results"]))
  assert list(data["results"]) == ["digits MLP 64-128-10"]
