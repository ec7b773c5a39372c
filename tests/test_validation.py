"""Bad input gives a clear error naming the problem and the fix.

The leaf and tree checks run for every transform in the registry
(``transforms.py``); the hyperparameter checks on ``madam``, whose factory
passes each one on to its parts. Errors specific to one module are tested
with it (``test_lns.py``, ``test_alias.py``).
"""

import jax
import jax.numpy as jnp
import pytest
import transforms

import madam_optax

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


WEIGHTS = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


def _params(case):
  return case.encode(WEIGHTS)[0]


def _update_error(case, grads, *params):
  """Traces ``init`` and ``update`` (no compilation): the checks run at
  trace time. ``params`` as passed to ``update`` (none: left out)."""
  init_params = _params(case)
  tx = case.transform(init_params)
  state = jax.eval_shape(tx.init, init_params)
  jax.eval_shape(lambda state: tx.update(grads, state, *params), state)


@pytest.mark.parametrize("case", transforms.cases(codes=False))
def test_integer_params_are_rejected_naming_the_leaf(case):
  params = {"layer": {"kernel": jnp.ones((2, 3)), "step": jnp.array([3])}}
  with pytest.raises(
    ValueError, match=r"\['layer'\]\['step'\].*int32.*floating"
  ):
    case.transform(params).init(params)


@pytest.mark.parametrize("case", transforms.cases(codes=True))
def test_float_params_are_rejected_by_code_transforms_naming_the_leaf(case):
  params = {"w": jnp.ones(3, case.code_format.dtype), "b": jnp.zeros(3)}
  with pytest.raises(
    ValueError, match=r"\['b'\].*float32.*with_additive_fallback"
  ):
    case.transform(params).init(params)


@pytest.mark.parametrize(
  "case", transforms.cases(where=lambda case: case.needs_params)
)
def test_missing_params_are_reported(case):
  grads = case.example_grads(_params(case), 0)
  with pytest.raises(ValueError, match="needs the current parameters"):
    _update_error(case, grads)


@pytest.mark.parametrize(
  "case", transforms.cases(check=transforms.MISMATCHED_TREES)
)
def test_mismatched_trees_are_reported(case):
  wrong = {"layer": {"kernel": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match="do not match"):
    _update_error(case, wrong, _params(case))


@pytest.mark.parametrize("case", transforms.cases())
def test_mismatched_shapes_are_reported(case):
  wrong = {"layer": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)}}
  with pytest.raises(
    ValueError, match=r"\['layer'\]\['kernel'\].*\(3, 2\).*\(2, 3\)"
  ):
    _update_error(case, wrong, _params(case))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"learning_rate": -0.01}, "learning_rate must be >= 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be finite"),
    ({"learning_rate": float("inf")}, "learning_rate must be finite"),
    ({"b2": 1.0}, "b2 must be < 1"),
    ({"b2": -0.5}, "b2 must be >= 0"),
    ({"g_bound": 0.0}, "g_bound must be > 0"),
    ({"g_bound": float("nan")}, "g_bound must be finite"),
    ({"p_scale": -3.0}, "p_scale must be > 0"),
    ({"max_magnitude": 0.0}, "max_magnitude must be > 0"),
    ({"state_dtype": jnp.int8}, "state_dtype must be a floating-point dtype"),
  ],
)
def test_invalid_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    madam_optax.madam(**kwargs)


def test_schedules_and_traced_hyperparameters_are_not_checked_in_python():
  madam_optax.madam(learning_rate=lambda count: 0.01 * 0.5**count)
  madam_optax.madam(learning_rate=jnp.asarray(0.02))
  jax.jit(lambda lr: madam_optax.madam(learning_rate=lr).init(WEIGHTS))(0.01)


@pytest.mark.parametrize(
  "make, what",
  [
    (madam_optax.clip_weight_magnitude, "bounds"),
    (
      lambda: madam_optax.log_quantise(madam_optax.LNSFormat.spanning(127)),
      "bounds",
    ),
  ],
)
def test_per_tensor_state_from_another_tree(make, what):
  tx = make()
  state = tx.init({"w": jnp.ones(3)})
  params = {"w": jnp.ones(3), "v": jnp.ones(2)}
  with pytest.raises(
    ValueError, match=f"state holds 1 {what} but params have 2 tensors"
  ):
    tx.update(params, state, params)
