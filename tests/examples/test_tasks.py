"""Every example task trains with Madam (and the zero-leaf recipe) on real
data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madam_examples import data
from madam_examples import loop
from madam_examples import step
from madam_examples import tasks
import madam_optax

STEPS = 25


def _train(task, optimizer="madam", lr=0.01, steps=STEPS):
  txs = loop.task_optimizers(task, optimizer, lr)
  state = loop.init_task_state(task, txs, jax.random.key(0))
  chunk = jax.jit(
    lambda s: step.train_chunk(task.losses, txs, s, task.data, steps)
  )
  new_state, sums = chunk(state)
  return state, new_state, jax.device_get(sums)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_supervised_models_learn_with_madam(name):
  task = tasks.build_task(name, quick=True)
  evaluate = jax.jit(task.evaluate)
  before, after, sums = _train(task)
  loss_before = float(evaluate(before.params, task.data)["test_loss"])
  metrics = jax.device_get(evaluate(after.params, task.data))
  assert np.isfinite(sums["model_loss"])
  assert metrics["test_loss"] < loss_before - 0.05, (name, loss_before, metrics)
  assert int(after.step) == STEPS


def test_zero_initialised_leaves_go_to_the_additive_optimizer():
  task = tasks.build_task("mlp", quick=True)
  params = loop.reference_params(task)["model"]
  labels = madam_optax.multiplicative_labels(params)
  flat = {
    jax.tree_util.keystr(p): v
    for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]
  }
  assert all(v == "additive" for k, v in flat.items() if "bias" in k)
  assert all(v == "multiplicative" for k, v in flat.items() if "kernel" in k)
  before, after, _ = _train(task, steps=5)
  b0, b1 = before.params["model"], after.params["model"]
  # Biases start at zero and move (Adam); kernels keep every sign (Madam).
  assert float(jnp.abs(b1["out"]["bias"]).max()) > 0
  np.testing.assert_array_equal(
    np.sign(b0["out"]["kernel"]), np.sign(b1["out"]["kernel"])
  )


def test_next_char_loss_is_the_shifted_cross_entropy():
  windows = jnp.array([[1, 2, 3], [3, 2, 1]])
  logits = jax.nn.one_hot(jnp.array([[2, 3], [2, 1]]), 5) * 50.0
  loss = tasks.next_char_loss(lambda tokens: logits, windows)
  assert float(loss) < 1e-6  # predicted every next token


def test_unknown_names_and_short_text_are_clear_errors():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.build_task("rnn")
  text = data.TextData(
    np.zeros(20, np.int32), np.zeros(5, np.int32), data.VOCAB
  )
  with pytest.raises(ValueError, match="too short for context 32"):
    tasks.language_model_task(
      text, context=32, dim=8, depth=1, batch_size=2, steps=1, eval_every=1
    )
