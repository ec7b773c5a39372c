"""The shared training step, on float weights and on LNS codes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import optimizers
from madam_examples import step
import madam_optax

FMT = madam_optax.LNSFormat.spanning(127)  # int8 codes


def _problem(seed=0):
  k_w, k_x = jax.random.split(jax.random.key(seed))
  params = {
    "model": {"w": jax.random.normal(k_w, (6, 3)) / 2, "b": jnp.zeros(3)}
  }
  x = jax.random.normal(k_x, (32, 6))
  data = {"x": x, "y": x @ jnp.ones((6, 3)) / 4}

  def loss(weights, data, key):
    del key
    p = weights["model"]
    return jnp.mean((data["x"] @ p["w"] + p["b"] - data["y"]) ** 2)

  return params, data, {"model": loss}


def test_encode_lns_matches_the_core_tree_encoder_under_vmap():
  params, _, _ = _problem()
  codes, scales = madam_optax.lns_encode_tree(params, FMT)
  got_codes, got_scales = step.encode_lns(params, params, FMT)
  chex.assert_trees_all_equal(got_codes, codes)
  chex.assert_trees_all_equal(got_scales, scales)
  # Traced parameters (a vmap over two seeds): leaves chosen from the
  # concrete reference, values encoded per seed.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), params, _problem(1)[0])
  vcodes, vscales = jax.vmap(lambda p: step.encode_lns(p, params, FMT))(stacked)
  assert vcodes["model"]["w"].dtype == jnp.int8
  assert vcodes["model"]["b"].dtype == jnp.float32 and (
    vscales["model"]["b"] is None
  )
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], vcodes), codes)


def test_weights_decode_codes_and_pass_floats_through():
  params, _, _ = _problem()
  tx = {"model": optax.sgd(0.1)}
  float_state = step.init_state(params, tx, jax.random.key(0))
  assert step.weights(float_state) is float_state.params
  codes, scales = step.encode_lns(params, params, FMT)
  state = step.init_state(
    codes, {"model": optax.adam(1e-3)}, jax.random.key(0), scales
  )
  chex.assert_trees_all_equal(
    step.weights(state, FMT), madam_optax.lns_decode_tree(codes, scales, FMT)
  )


def test_train_step_is_apply_gradients_of_the_loss():
  params, data, losses = _problem()
  txs = {"model": optax.sgd(0.1)}
  state = step.init_state(params, txs, jax.random.key(0))
  new, metrics = step.train_step(losses, txs, state, data)
  grads = jax.grad(lambda p: losses["model"]({"model": p}, data, None))(
    params["model"]
  )
  want, _ = step.apply_gradients(
    txs["model"], grads, state.opt_state["model"], params["model"]
  )
  chex.assert_trees_all_close(new.params["model"], want, rtol=1e-6)
  assert int(new.step) == 1 and set(metrics) == {"model_loss"}
  assert not np.array_equal(
    jax.random.key_data(new.key), jax.random.key_data(state.key)
  )


@pytest.mark.parametrize("lns", [False, True])
def test_chunk_of_n_steps_is_n_steps_and_learns(lns):
  params, data, losses = _problem()
  fmt = FMT if lns else None
  scales = None
  if lns:
    params, scales = step.encode_lns(params, params, FMT)
  txs = optimizers.make_optimizers(
    params, "lns_madam" if lns else "madam", 0.05, lns_format=FMT
  )
  state = step.init_state(params, txs, jax.random.key(0), scales)
  chunk = jax.jit(
    lambda s, n: step.train_chunk(losses, txs, s, data, n, lns_format=fmt)
  )
  one_by_one = state
  for _ in range(4):
    one_by_one, _ = step.train_step(
      losses, txs, one_by_one, data, lns_format=fmt
    )
  state, sums = chunk(state, jnp.int32(4))
  chex.assert_trees_all_close(state.params, one_by_one.params, rtol=1e-6)
  state, later = chunk(state, jnp.int32(40))  # same compiled chunk
  assert float(later["model_loss"]) / 40 < float(sums["model_loss"]) / 4
  assert state.params["model"]["w"].dtype == (jnp.int8 if lns else jnp.float32)
  assert int(state.step) == 44
