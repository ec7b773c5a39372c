"""The int8 + factored Transformer example (madam_examples/lns_transformer.py)."""

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("flax.nnx")

from madam_examples import lns_transformer  # noqa: E402
from madam_examples import memory  # noqa: E402


def test_main_trains_int8_codes_with_factored_statistics(capsys):
  out = lns_transformer.main(["--quick", "--steps", "15"])
  text = capsys.readouterr().out
  assert out["steps"] == 15
  assert out["code_dtypes"] == ["int8"]
  assert out["perplexity"] < out["perplexity_before"]
  state = out["state"]
  model = state.params["model"]
  codes = jax.tree.leaves(state.params)
  assert {str(c.dtype) for c in codes} == {"int8", "float32"}
  # The recipe: hidden kernels as int8 codes; embeddings, head, norms and
  # biases float32, trained by Adam.
  block = model["blocks"][0]
  for name in ("qkv", "out", "up", "down"):
    assert block[name]["kernel"].dtype == jnp.int8
  for leaf in (
    model["embed"]["embedding"],
    model["position"],
    model["head"]["kernel"],
    block["norm1"]["scale"],
    block["up"]["bias"],
  ):
    assert leaf.dtype == jnp.float32
  # A statistic per row and per column of a hidden matrix (32 x 128).
  inner = state.opt_state["model"].inner_states["multiplicative"].inner_state[0]
  kernel = block["up"]["kernel"]
  assert inner.row_rms_hat["blocks"][0]["up"]["kernel"].shape == (
    kernel.shape[0],
  )
  assert inner.col_rms_hat["blocks"][0]["up"]["kernel"].shape == (
    kernel.shape[1],
  )
  # The bytes are counted from those arrays: codes and float leaves plus one
  # float32 scale per encoded tensor.
  held = out["bytes_per_parameter"]
  n = sum(c.size for c in codes)
  encoded = sum(c.dtype == jnp.int8 for c in codes)
  assert held["parameters"] == n
  assert held["weights"] * n == sum(c.nbytes for c in codes) + 4 * encoded
  assert held["total"] == pytest.approx(held["weights"] + held["optimizer"])
  # int8 codes for the 24,576 hidden-matrix entries, float32 for the other
  # 7,872 (a quarter: this model is small); Adam's two moments of those.
  float_share = sum(c.size for c in codes if c.dtype == jnp.float32) / n
  assert 0.2 < float_share < 0.3
  # Beyond Adam's 8 bytes per float parameter: the factored statistics of
  # the codes (a row and a column per matrix), counts and the PRNG key.
  assert 8 * float_share < held["optimizer"] < 8 * float_share + 0.25
  assert f"{held['total']:.3f}" in text and "perplexity" in text


def test_low_memory_additive_optimizers_hold_less_state():
  reference = {
    "embed": {"embedding": jnp.full((64, 32), 0.02)},
    "up": {"kernel": jnp.full((32, 64), 0.1), "bias": jnp.zeros(64)},
  }
  codes, _ = lns_transformer.encode_recipe(
    reference, reference, lns_transformer.INT8, p_scale=2.0
  )
  assert codes["up"]["kernel"].dtype == jnp.int8
  assert codes["embed"]["embedding"].dtype == jnp.float32

  def state_bytes(additive):
    tx = lns_transformer.recipe_optimizer(codes, 0.01, additive=additive)
    state = tx.init(codes).inner_states["additive"]
    return memory.tree_bytes(state)

  floats = 64 * 32 + 64
  # Adam: two float32 moments; a bfloat16 first moment saves 2 bytes; the
  # factored statistic keeps a row and a column of the embedding (and the
  # bias's own).
  assert state_bytes("adam") >= 8 * floats
  assert 6 * floats <= state_bytes("adam_bf16") < 6 * floats + 64
  assert state_bytes("factored") < 4 * (64 + 32 + 64) + 64


@pytest.mark.parametrize(
  "flag, value",
  [
    ("--steps", "0"),
    ("--steps", "-3"),
    ("--steps", "x"),
    ("--lr", "0"),
    ("--lr", "inf"),
    ("--lr", "nan"),
    ("--additive-lr", "inf"),
    ("--additive", "sgd"),
  ],
)
def test_arguments_are_validated(flag, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    lns_transformer.main([flag, value])
  assert exit_info.value.code == 2
  assert flag in capsys.readouterr().err
