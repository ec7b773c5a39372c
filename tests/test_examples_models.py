"""Every example model trains with Madam (and the zero-leaf recipe) on real data."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import madam_optax
from madam_examples import train as train_lib

STEPS = 25


def _train(task, optimizer="madam", lr=0.01, steps=STEPS):
  txs = train_lib.make_optimizers(task, optimizer, lr)
  state = train_lib.init_state(task, txs, jax.random.key(0))
  chunk = jax.jit(lambda s: train_lib.train_chunk(task, txs, s, task.data,
                                                  steps))
  new_state, sums = chunk(state)
  return state, new_state, jax.device_get(sums)


@pytest.mark.parametrize(
    "name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow), "transformer"])
def test_supervised_models_learn_with_madam(name):
  task = train_lib.build_task(name, quick=True)
  evaluate = jax.jit(task.evaluate)
  before, after, sums = _train(task)
  loss_before = float(evaluate(before.params, task.data)["test_loss"])
  metrics = jax.device_get(evaluate(after.params, task.data))
  assert np.isfinite(sums["model_loss"])
  assert metrics["test_loss"] < loss_before - 0.05, (name, loss_before,
                                                     metrics)
  assert int(after.step) == STEPS


def test_gan_discriminator_learns_and_generator_moves():
  task = train_lib.build_task("gan", quick=True)
  d_loss = jax.jit(task.losses["discriminator"])
  key = jax.random.key(7)
  before, after, sums = _train(task)
  assert np.isfinite(sums["discriminator_loss"])
  assert np.isfinite(sums["generator_loss"])
  # Against the initial generator's samples, the trained discriminator's
  # loss is lower than the initial discriminator's.
  trained_d = {**before.params, "discriminator": after.params["discriminator"]}
  assert float(d_loss(trained_d, task.data, key)) < float(
      d_loss(before.params, task.data, key)) - 0.05
  moved = jax.tree.map(lambda a, b: jnp.any(a != b),
                       before.params["generator"], after.params["generator"])
  assert all(jax.tree.leaves(moved))
  fd = float(jax.jit(task.evaluate)(after.params, task.data)[
      "frechet_distance"])
  assert np.isfinite(fd) and fd > 0
  chex.assert_trees_all_equal_structs(before, after)


def test_zero_initialised_leaves_go_to_the_additive_optimizer():
  task = train_lib.build_task("mlp", quick=True)
  params = train_lib.reference_params(task)["model"]
  labels = madam_optax.multiplicative_labels(params)
  flat = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert all(v == "additive" for k, v in flat.items() if "bias" in k)
  assert all(v == "multiplicative" for k, v in flat.items() if "kernel" in k)
  before, after, _ = _train(task, steps=5)
  b0, b1 = before.params["model"], after.params["model"]
  # Biases start at zero and move (Adam); kernels keep every sign (Madam).
  assert float(jnp.abs(b1["out"]["bias"][...]).max()) > 0
  np.testing.assert_array_equal(np.sign(b0["out"]["kernel"][...]),
                                np.sign(b1["out"]["kernel"][...]))


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown task"):
    train_lib.build_task("rnn")
  task = train_lib.build_task("mlp", quick=True)
  with pytest.raises(ValueError, match="unknown optimizer"):
    train_lib.make_optimizers(task, "lion", 0.1)
  with pytest.raises(ValueError, match="unknown schedule"):
    train_lib.learning_rate_schedule(0.1, "linear", 10)
