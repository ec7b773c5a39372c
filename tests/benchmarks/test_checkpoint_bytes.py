"""``benchmarks/checkpoint_bytes.py``: Orbax checkpoint bytes per parameter."""

import json

import jax
import pytest


@pytest.fixture(scope="module")
def checkpoint_bytes(benchmark):
  return benchmark("checkpoint_bytes")


def test_measures_int8_codes_on_disk(checkpoint_bytes, harness, tmp_path):
  params = harness.mlp_params((8, 4))  # the model as small as it gets
  row = checkpoint_bytes.measure(
    "lns_madam_int8", params, 2, tmp_path, log=lambda *_: None
  )
  assert row["n_params"] == 8 * 4 + 4
  assert row["kernel_dtype_on_disk"] == "int8"
  # Parameters only: int8 kernel codes (1 B each), float32 biases (zero, so
  # not encoded) and the kernel's float32 scale; on disk that plus Orbax's
  # metadata files.
  assert row["params"]["memory_bytes"] == 8 * 4 + 4 * 4 + 4
  for part in ("full", "params"):
    assert row[part]["disk_bytes"] > 0 and row[part]["files"] >= 5
  size, _, files = checkpoint_bytes.folder_bytes(
    tmp_path / "lns_madam_int8" / "params"
  )
  assert (size, files) == (row["params"]["disk_bytes"], row["params"]["files"])


def test_trained_state_is_not_the_initial_one(checkpoint_bytes, harness):
  params = harness.mlp_params((6, 5, 3))
  state = checkpoint_bytes.train_state("adam", params, 2)
  mu = state["opt_state"][0].mu
  assert int(state["opt_state"][0].count) == 2
  assert all(bool((m != 0).all()) for m in jax.tree.leaves(mu))  # dense
  assert bool((state["params"]["dense0"]["bias"] != 0).all())


def test_quick_main_writes_the_table(checkpoint_bytes, harness, tmp_path):
  results = checkpoint_bytes.main(
    ["--quick", "--steps", "2", "--optimizers", "adam", "--out", str(tmp_path)],
    log=lambda *_: None,
  )
  assert results["dims"] == [32, 64, 10] and results["steps"] == 2
  saved = json.loads((tmp_path / "checkpoint_bytes.json").read_text())
  assert tuple(saved["machine"]) == harness.MACHINE_KEYS
  assert saved["machine"]["versions"]["orbax_checkpoint"]
  assert saved["n_params"] == 32 * 64 + 64 + 64 * 10 + 10
  (row,) = saved["rows"]
  assert row["optimizer"] == "adam" and row["kernel_dtype_on_disk"] == "float32"
  # Weights, mu and nu in float32, plus Adam's step count.
  assert row["full"]["memory_bytes"] == 12 * saved["n_params"] + 4
  md = (tmp_path / "checkpoint_bytes.md").read_text()
  assert "| adam | optax.adam, float32 weights, mu and nu |" in md


def test_unknown_optimizer_is_refused(checkpoint_bytes):
  with pytest.raises(SystemExit):
    checkpoint_bytes.parse_args(["--optimizers", "madam,rmsprop"])
