"""The int8 + factored Transformer example (madam_examples/lns_transformer.py)."""

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("flax.nnx")

from madam_examples import lns_transformer  # noqa: E402


def test_main_trains_int8_codes_with_factored_statistics(capsys):
  out = lns_transformer.main(["--quick", "--steps", "15"])
  text = capsys.readouterr().out
  assert out["steps"] == 15
  assert out["code_dtypes"] == ["int8"]
  assert out["perplexity"] < out["perplexity_before"]
  state = out["state"]
  codes = jax.tree.leaves(state.params)
  assert {str(c.dtype) for c in codes} == {"int8", "float32"}
  # A statistic per row and per column of the output layer (32 x vocab).
  inner = state.opt_state["model"].inner_states["multiplicative"].inner_state[0]
  kernel = state.params["model"]["head"]["kernel"]
  assert inner.row_rms["head"]["kernel"].shape == (kernel.shape[0],)
  assert inner.col_rms["head"]["kernel"].shape == (kernel.shape[1],)
  # The bytes are counted from those arrays: codes and float leaves plus one
  # float32 scale per encoded tensor.
  held = out["bytes_per_parameter"]
  n = sum(c.size for c in codes)
  encoded = sum(c.dtype == jnp.int8 for c in codes)
  assert held["parameters"] == n
  assert held["weights"] * n == sum(c.nbytes for c in codes) + 4 * encoded
  assert held["total"] == pytest.approx(held["weights"] + held["optimizer"])
  # int8 codes for most parameters, float32 zero-initialised biases; the
  # factored statistics and Adam's moments of the biases stay under a byte.
  assert 1.0 < held["weights"] < 2.0 and held["optimizer"] < 1.0
  assert f"{held['total']:.3f}" in text and "perplexity" in text


@pytest.mark.parametrize(
  "flag, value",
  [("--steps", "0"), ("--steps", "-3"), ("--steps", "x"), ("--lr", "0")],
)
def test_arguments_are_validated(flag, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    lns_transformer.main([flag, value])
  assert exit_info.value.code == 2
  assert flag in capsys.readouterr().err
