"""The LNS example (``madam_examples.lns_digits``) in quick mode."""

from flax import nnx
import jax
import pytest

from madam_examples import lns_digits
from madam_examples import memory

pytest.importorskip("sklearn")


def test_lns_digits_example_trains_int8_weights(capsys):
  out = lns_digits.main(["--quick", "--steps", "60"])
  assert out["steps"] == 60
  assert out["lns_dtypes"] == ["int8"]  # every check, every kernel
  assert out["lns_param_bytes"] < 0.3 * out["float_param_bytes"]
  assert out["lns_accuracy"] > 60.0 and out["float_accuracy"] > 60.0
  text = capsys.readouterr().out
  assert "lns_madam (int8 weights)" in text and "madam (float32" in text


@pytest.mark.parametrize(
  "name,params,nbytes",
  [("mlp", 64 * 128 + 128 + 128 * 10 + 10, 38_440), ("cnn", 3818, 15_272)],
)
def test_models_are_the_documented_ones(name, params, nbytes):
  """The sizes the README's LNS table reports (float32 bytes)."""
  model = nnx.eval_shape(lambda: lns_digits.MODELS[name](nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(state)) == params
  assert memory.tree_bytes(state) == nbytes
