"""Smoke test of the LNS example (madam_examples/lns_digits.py) in quick
mode (the accuracy-versus-bits benchmark's: tests/benchmarks/)."""

import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")


def test_lns_digits_example_trains_int8_weights():
  from madam_examples import lns_digits  # pylint: disable=g-import-not-at-top
  out = lns_digits.main(["--quick", "--steps", "60"])
  assert out["steps"] == 60
  assert out["lns_dtypes"] == ["int8"]            # every check, every kernel
  assert out["lns_param_bytes"] < 0.3 * out["float_param_bytes"]
  assert out["lns_accuracy"] > 60.0 and out["float_accuracy"] > 60.0
