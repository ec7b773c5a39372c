"""Training runs: ``train`` (history, callback, LNS, checkpoints) and the
``vmap``-able run of the learning-rate study."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import data
from madam_examples import loop
from madam_examples import models
from madam_examples import step
from madam_examples import tasks
import madam_optax

FMT = madam_optax.LNSFormat.spanning(127)  # int8 codes


@pytest.fixture(scope="module")
def task():
  """A small MLP on the digits: quick to compile and to train."""
  return tasks.classification_task(
    "tiny",
    "MLP 64-32-10 on digits",
    data.load_digits(),
    lambda r: models.MLP(64, (32,), 10, rngs=r),
    batch_size=32,
    steps=150,
    eval_every=75,
  )


def test_train_history_and_callback(task):
  calls = []
  state, history = loop.train(
    task,
    "madam",
    0.01,
    eval_every=60,
    schedule="constant",
    callback=lambda step, metrics, s: calls.append(
      (step, sorted(metrics), int(s.step))
    ),
  )
  assert history["step"].tolist() == [60, 120, 150]
  assert int(history["resumed_from"]) == 0 and int(state.step) == 150
  # Compilation is timed apart from the steady-state steps.
  assert float(history["compile_seconds"]) > 0
  assert float(history["train_seconds"]) > 0
  assert calls[0] == (0, [], 0)
  assert [c[0] for c in calls[1:]] == [60, 120, 150]
  assert [c[2] for c in calls[1:]] == [60, 120, 150]
  assert calls[-1][1] == ["accuracy", "model_loss", "test_loss"]
  assert history["model_loss"][-1] < history["model_loss"][0]
  assert history["accuracy"][-1] > 85.0


def test_lns_training_keeps_int8_codes_and_learns(task):
  dtypes = []
  state, history = loop.train(
    task,
    "lns_madam",
    0.01,
    schedule="constant",
    lns_format=FMT,
    optimizer_options={"state_dtype": jnp.bfloat16},
    callback=lambda step, metrics, s: dtypes.append(
      s.params["model"]["hidden"][0]["kernel"].dtype
    ),
  )
  assert set(dtypes) == {jnp.dtype(jnp.int8)}
  params = state.params["model"]
  assert params["out"]["kernel"].dtype == jnp.int8
  assert params["out"]["bias"].dtype == jnp.float32  # Adam's, in float
  assert state.max_magnitudes["model"]["out"]["bias"] is None
  assert history["accuracy"][-1] > 85.0
  # The same initial weights, decoded, are the float run's within a level.
  fresh = loop.init_task_state(
    task,
    loop.task_optimizers(task, "lns_madam", 0.01, lns_format=FMT),
    jax.random.key(0),
    lns_format=FMT,
  )
  float_init = task.init(jax.random.split(jax.random.key(0))[0])
  decoded = jax.tree.map(np.asarray, step.weights(fresh, FMT))
  w, w_hat = (t["model"]["out"]["kernel"] for t in (float_init, decoded))
  inside = (np.abs(w) <= 3 * np.sqrt(np.mean(np.asarray(w) ** 2))) & (
    np.abs(w) >= 3 * np.sqrt(np.mean(np.asarray(w) ** 2)) * np.exp(-4.0)
  )
  np.testing.assert_allclose(
    np.log(np.abs(w_hat[inside])),
    np.log(np.abs(np.asarray(w)[inside])),
    atol=FMT.log_base / 2 + 1e-6,
  )


def test_optimizer_factory_and_unknown_name(task):
  _, history = loop.train(task, lambda lr, params: optax.sgd(lr), 0.1, steps=30)
  assert np.isfinite(history["model_loss"]).all()
  with pytest.raises(ValueError, match="unknown optimizer"):
    loop.train(task, "lion", 0.1)


def test_run_fn_vmaps_over_seeds_and_learning_rates(task):
  run = loop.make_run_fn(
    task, "lns_madam", 150, 75, schedule="constant", lns_format=FMT
  )
  keys = jax.random.split(jax.random.key(0), 2)
  history = jax.jit(jax.vmap(run, in_axes=(0, 0, None)))(
    keys, jnp.array([0.01, 0.02]), task.data
  )
  assert history["accuracy"].shape == (2, 2)
  assert np.all(history["accuracy"][:, -1] > 85.0)
  assert not np.array_equal(history["model_loss"][0], history["model_loss"][1])


def test_lns_run_resumes_from_checkpoint_and_refuses_another_format(
  task, tmp_path
):
  kwargs = dict(
    steps=40,
    eval_every=20,
    lns_format=FMT,
    checkpoint_dir=str(tmp_path),
    checkpoint_every=20,
  )
  first, history = loop.train(task, "lns_madam", 0.01, **kwargs)
  shutil.rmtree(tmp_path / "40")  # cut short after step 20
  resumed, again = loop.train(task, "lns_madam", 0.01, **kwargs)
  assert int(again["resumed_from"]) == 20
  np.testing.assert_array_equal(again["accuracy"], history["accuracy"])
  jax.tree.map(np.testing.assert_array_equal, resumed.params, first.params)
  with pytest.raises(ValueError, match="lns_format"):
    loop.train(
      task,
      "lns_madam",
      0.01,
      **{**kwargs, "lns_format": madam_optax.LNSFormat.spanning(100)},
    )
