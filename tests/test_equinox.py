"""Madam on an Equinox model: ``None`` leaves, the zero-leaf recipe, the CLI."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import equinox_mlp
import madam_optax


@pytest.fixture(scope="module")
def trained():
  return equinox_mlp.train(100, seed=0)


def test_filtered_model_has_none_leaves_and_the_expected_labels():
  model = equinox_mlp.MLP(16, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  assert params.head.bias is None and params.activation is None
  labels = madam_optax.multiplicative_labels(params)
  assert labels.norm.bias == "additive"  # LayerNorm offset: zeros
  for label in (
    labels.hidden.weight,
    labels.hidden.bias,
    labels.norm.weight,
    labels.head.weight,
  ):
    assert label == "multiplicative"
  assert labels.head.bias is None and labels.activation is None


def test_with_additive_fallback_accepts_a_callable_model_tree():
  """An Equinox model, so its tree of labels, is callable: not a label fn."""
  model = equinox_mlp.MLP(16, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = madam_optax.with_additive_fallback(
    params, madam_optax.madam(), optax.adam(1e-3)
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert updates.head.bias is None and updates.activation is None
  # Madam's first step is a pure sign step: w -> w * exp(-lr * sign(g w)).
  w = np.asarray(params.head.weight, np.float64)
  np.testing.assert_allclose(
    params.head.weight + updates.head.weight,
    w * np.exp(-0.01 * np.sign(w)),
    rtol=1e-6,
  )
  # Adam's first step on the zero leaf: -lr * sign(g).
  np.testing.assert_allclose(updates.norm.bias, -1e-3, rtol=1e-4)


def test_plain_madam_steps_a_filtered_model_with_none_leaves():
  model = equinox_mlp.MLP(16, key=jax.random.key(1))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = madam_optax.madam()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = eqx.apply_updates(model, updates)
  assert new.head.bias is None and new.activation is jax.nn.relu
  np.testing.assert_array_equal(new.norm.bias, 0.0)  # zeros cannot move


def test_training_learns_the_digits_and_keeps_madam_weight_signs(trained):
  initial = equinox_mlp.MLP(128, key=jax.random.split(jax.random.key(0))[0])
  assert trained.losses[-10:].mean() < 0.25 * trained.losses[:5].mean()
  assert trained.test_accuracy > 0.9
  for name in ("hidden", "head"):
    before = getattr(initial, name).weight
    after = getattr(trained.model, name).weight
    np.testing.assert_array_equal(np.sign(after), np.sign(before))
    w_max = madam_optax.initial_max_magnitude(before)
    assert float(jnp.max(jnp.abs(after))) <= float(w_max)
  # The zero-initialised offset was trained by Adam.
  assert float(jnp.max(jnp.abs(trained.model.norm.bias))) > 0
  assert trained.model.head.bias is None


def test_main_prints_labels_and_accuracy(capsys):
  result = equinox_mlp.main(["--steps", "3", "--batch-size", "8"])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (
    "Madam: hidden.weight, hidden.bias, norm.weight, head.weight; "
    "Adam(0.001): norm.bias; None (not trained): head.bias, activation"
  )
  assert "3 steps" in out[1] and "test accuracy" in out[1]
  assert len(result.losses) == 3


def test_train_rejects_nonpositive_steps():
  with pytest.raises(ValueError, match="steps must be at least 1"):
    equinox_mlp.train(0)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
    (["--lr", "0"], "argument --lr: must be positive, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
  ],
)
def test_parse_args_rejects_bad_arguments(argv, message, capsys):
  """One line each (the command-line subprocess: tests/examples/test_cli.py)."""
  with pytest.raises(SystemExit) as exit_info:
    equinox_mlp.parse_args(argv)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.splitlines() == [
    f"python -m madam_examples.equinox_mlp: error: {message}"
  ]
