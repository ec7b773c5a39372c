"""The optimizer factory: names, the zero-leaf recipe, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import optimizers
import madam_optax

PARAMS = {"w": jnp.array([[0.5, -1.0], [0.25, 2.0]]), "b": jnp.zeros(2)}
GRADS = {"w": jnp.array([[1.0, 1.0], [-1.0, 1.0]]), "b": jnp.array([3.0, -2.0])}


def _step(tx, params):
  updates, _ = tx.update(GRADS, tx.init(params), params)
  return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["madam", "lns_madam"])
def test_madam_variants_send_zero_leaves_to_adam(name):
  fmt = madam_optax.LNSFormat.spanning(127)
  params = PARAMS
  if name == "lns_madam":
    params, _ = madam_optax.lns_encode_tree(PARAMS, fmt)
  tx = optimizers.make_optimizer(
    name, 0.01, params, lns_format=fmt, additive_learning_rate=0.05
  )
  new = _step(tx, params)
  # Adam's first step moves each bias by its learning rate, against the sign
  # of the gradient; Madam (or LNS-Madam) keeps the weights' signs.
  np.testing.assert_allclose(new["b"], [-0.05, 0.05], rtol=1e-4)
  np.testing.assert_array_equal(np.sign(new["w"]), np.sign(params["w"]))
  assert new["w"].dtype == params["w"].dtype
  assert not np.array_equal(new["w"], params["w"])


def test_madam_options_reach_the_core_transform():
  tx = optimizers.make_optimizer(
    "madam", 0.01, PARAMS, p_scale=1.0, state_dtype=jnp.bfloat16
  )
  state = tx.init(PARAMS)
  dtypes = {
    x.dtype
    for x in jax.tree.leaves(state.inner_states["multiplicative"])
    if x.ndim
  }
  assert jnp.dtype(jnp.bfloat16) in dtypes
  # p_scale=1: no weight grows past its tensor's initial RMS.
  params = PARAMS
  for _ in range(50):  # gradients that grow every weight
    updates, state = tx.update(
      jax.tree.map(lambda w: -w, params), state, params
    )
    params = optax.apply_updates(params, updates)
  rms = float(jnp.sqrt(jnp.mean(PARAMS["w"] ** 2)))
  assert float(jnp.abs(params["w"]).max()) <= rms * (1 + 1e-6)


def test_adam_and_sgd_are_optax_defaults():
  for name, reference in (
    ("adam", optax.adam(1e-3)),
    ("sgd", optax.sgd(0.1, momentum=0.9)),
  ):
    lr = optimizers.DEFAULT_LEARNING_RATES[name]
    got = _step(optimizers.make_optimizer(name, lr, PARAMS), PARAMS)
    want = _step(reference, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_make_optimizers_one_per_component_with_schedule():
  reference = {"generator": PARAMS, "discriminator": {"w": PARAMS["w"]}}
  txs = optimizers.make_optimizers(
    reference, "adam", 0.1, schedule="cosine", steps=10
  )
  assert set(txs) == set(reference)
  schedule = optimizers.learning_rate_schedule(0.1, "cosine", 10)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(10)) == 0.0
  assert optimizers.learning_rate_schedule(0.1, "constant", 10) == 0.1


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
    optimizers.make_optimizer("lion", 0.1, PARAMS)
  with pytest.raises(ValueError, match="unknown schedule"):
    optimizers.learning_rate_schedule(0.1, "linear", 10)
  with pytest.raises(ValueError, match="pass lns_format"):
    optimizers.make_optimizer("lns_madam", 0.01, PARAMS)


LM = {
  "embed": {"embedding": jnp.array([[0.5, -0.5], [0.25, 0.75]])},
  "dense": {"kernel": jnp.array([[0.5, -1.0], [0.25, 2.0]])},
}


def _step_ones(tx, params):
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def _madam(w, lr=0.01):
  """Madam's first step with a gradient of ones: g_n = 1."""
  return w * np.exp(-lr * np.sign(w))


def test_auto_leaves_use_the_recipe_for_a_model_with_an_embedding():
  assert optimizers.resolve_leaves("auto", LM) == "recipe"
  assert optimizers.resolve_leaves("auto", PARAMS) == "zero"
  tx = optimizers.make_optimizer("madam", 0.01, LM)
  new = _step_ones(tx, LM)
  # The embedding is Adam's (the recipe's rate), the kernel Madam's.
  lr = madam_optax.ADDITIVE_LEARNING_RATE
  np.testing.assert_allclose(
    new["embed"]["embedding"], LM["embed"]["embedding"] - lr, rtol=1e-4
  )
  np.testing.assert_allclose(
    new["dense"]["kernel"], _madam(LM["dense"]["kernel"]), rtol=1e-6
  )
  # "zero": the embedding (not all zero) is Madam's.
  tx = optimizers.make_optimizer("madam", 0.01, LM, leaves="zero")
  new = _step_ones(tx, LM)
  np.testing.assert_allclose(
    new["embed"]["embedding"], _madam(LM["embed"]["embedding"]), rtol=1e-6
  )
  with pytest.raises(ValueError, match="unknown leaves 'all'"):
    optimizers.make_optimizer("madam", 0.01, LM, leaves="all")


def test_recipe_schedules_the_additive_rate_like_madams():
  txs = optimizers.make_optimizers(
    {"model": LM}, "madam", 0.01, schedule="cosine", steps=4
  )
  params, state = LM, txs["model"].init(LM)
  grads = jax.tree.map(jnp.ones_like, LM)
  moves = []
  for _ in range(4):
    updates, state = txs["model"].update(grads, state, params)
    moves.append(float(jnp.abs(updates["embed"]["embedding"]).mean()))
    params = optax.apply_updates(params, updates)
  # Adam's step with a constant gradient is its rate: the cosine decay's.
  schedule = optimizers.learning_rate_schedule(
    madam_optax.ADDITIVE_LEARNING_RATE, "cosine", 4
  )
  np.testing.assert_allclose(moves, [schedule(t) for t in range(4)], rtol=1e-3)
