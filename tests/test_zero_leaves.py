"""``madam()`` and ``clip_weight_magnitude`` warn at ``init`` about all-zero
leaves, which a multiplicative update never moves: once, eagerly, naming the
leaves and the fix; silent under tracing and when the user opts out."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import madam_optax

PARAMS = {
  "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))},
  "out": {"bias": jnp.zeros((1,)), "kernel": jnp.full((2, 1), 0.5)},
  "empty": jnp.zeros((0,)),
}
FACTORIES = {
  "madam": lambda **kw: madam_optax.madam(**kw),
  "madam_b1": lambda **kw: madam_optax.madam(b1=0.9, **kw),
  "madam_factored": lambda **kw: madam_optax.madam(factored=True, **kw),
  "clip_weight_magnitude": lambda **kw: madam_optax.clip_weight_magnitude(**kw),
  "inject_hyperparams": lambda **kw: optax.inject_hyperparams(
    madam_optax.madam
  )(learning_rate=0.1, **kw),
}


def _recorded(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fn()
  return [w for w in caught if "all-zero parameter leaves" in str(w.message)]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_warns_once_naming_the_leaves_and_the_fix(name):
  tx = FACTORIES[name]()
  caught = _recorded(lambda: tx.init(PARAMS))
  assert len(caught) == 1
  message = str(caught[0].message)
  assert issubclass(caught[0].category, UserWarning)
  assert "['dense']['bias']" in message and "['out']['bias']" in message
  assert "kernel" not in message and "empty" not in message
  assert "with_additive_fallback" in message


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_opting_out_is_silent(name):
  tx = FACTORIES[name](warn_zero_leaves=False)
  assert not _recorded(lambda: tx.init(PARAMS))
  # A standard filter, as the docstring shows, silences the default too.
  tx = FACTORIES[name]()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings(
      "ignore", message=".*all-zero parameter leaves at init"
    )
    tx.init(PARAMS)


def test_silent_under_tracing_and_without_zero_leaves():
  tx = madam_optax.madam()
  assert not _recorded(lambda: jax.jit(tx.init)(PARAMS))
  assert not _recorded(lambda: jax.eval_shape(tx.init, PARAMS))
  assert not _recorded(lambda: tx.init({"w": jnp.array([0.0, 1.0])}))


def test_silent_for_the_fix():
  tx = madam_optax.with_additive_fallback(PARAMS, madam_optax.madam())
  assert not _recorded(lambda: tx.init(PARAMS))


def test_concrete_leaves_inside_a_trace():
  # Closed over by a jitted function (with warn_zero_leaves injected as an
  # array): the values are known, so the check runs, and does not fail.
  tx = FACTORIES["inject_hyperparams"]()
  assert len(_recorded(lambda: jax.jit(lambda: tx.init(PARAMS))())) == 1
