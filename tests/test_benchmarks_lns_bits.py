"""Smoke test of the accuracy-versus-bits benchmark (benchmarks/lns_bits.py)
in quick mode."""

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")

_BITS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lns_bits.py"


@pytest.mark.slow
def test_lns_bits_quick_run_writes_report(tmp_path):
  spec = importlib.util.spec_from_file_location("lns_bits", _BITS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(["--quick", "--out", str(tmp_path)])
  md = (tmp_path / "lns_bits.md").read_text()
  assert "| lns_madam_det | lns_madam_stoch | adam_proj | sgd_proj |" in md
  assert "smallest width within 0.5 points" in md
  assert (tmp_path / "lns_bits.png").stat().st_size > 0
  data = json.loads((tmp_path / "lns_bits.json").read_text())
  for key in ("cpu", "cores", "jax", "optax", "flax", "date"):
    assert data["machine"][key]
  rows = results["mlp"]["rows"]
  assert {r["method"] for r in rows} == {"lns_madam_det", "lns_madam_stoch",
                                        "adam_proj", "sgd_proj"}
  # The LNS-Madam runs really trained integer codes (dtype read after training).
  assert {r["codes"] for r in rows if r["method"].startswith("lns")} == {"int8"}
