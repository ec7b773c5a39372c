"""``benchmarks/checkpoint_bytes.py``: bytes on disk per parameter."""

import importlib.util
import pathlib

_PATH = (pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
         / "checkpoint_bytes.py")


def _module():
  spec = importlib.util.spec_from_file_location("checkpoint_bytes", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_checkpoint_bytes_benchmark_measures_int8_codes_on_disk(tmp_path):
  """The benchmark on a tiny MLP, one optimizer."""
  bench = _module()
  params = bench.init_params((8, 4))      # the model as small as it gets
  row = bench.measure("lns_madam_int8", params, 2, tmp_path,
                      log=lambda *_: None)
  assert row["n_params"] == 8 * 4 + 4
  assert row["kernel_dtype_on_disk"] == "int8"
  # Parameters only: int8 kernel codes (1 B each), float32 biases (zero, so
  # not encoded) and the kernel's float32 scale; on disk that plus Orbax's
  # metadata files.
  assert row["params"]["memory_bytes"] == 8 * 4 + 4 * 4 + 4
  for part in ("full", "params"):
    assert row[part]["disk_bytes"] > 0 and row[part]["files"] >= 5
  size, _, files = bench.folder_bytes(tmp_path / "lns_madam_int8" / "params")
  assert (size, files) == (row["params"]["disk_bytes"],
                           row["params"]["files"])
