"""Bad input gives a clear error naming the problem and the fix."""

import jax.numpy as jnp
import pytest

import madam_optax

PARAMS = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
GRADS = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}

FACTORIES = [madam_optax.madam, madam_optax.scale_by_second_moment,
             madam_optax.multiplicative_step, madam_optax.clip_weight_magnitude]
NEEDS_PARAMS = [madam_optax.madam, madam_optax.multiplicative_step,
                madam_optax.clip_weight_magnitude]


@pytest.mark.parametrize("factory", FACTORIES)
def test_integer_params_are_rejected_naming_the_leaf(factory):
  params = {"layer": {"kernel": jnp.ones((2, 3)), "step": jnp.array(3)}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['step'\].*int32.*floating"):
    factory().init(params)


def test_integer_gradients_are_rejected():
  tx = madam_optax.scale_by_second_moment()
  with pytest.raises(ValueError, match=r"updates leaf \['w'\].*int32"):
    tx.update({"w": jnp.array([1, 2])}, tx.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("factory", NEEDS_PARAMS)
def test_missing_params_are_reported(factory):
  tx = factory()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(GRADS, state)


@pytest.mark.parametrize("factory", NEEDS_PARAMS)
def test_mismatched_trees_are_reported(factory):
  tx = factory()
  state = tx.init(PARAMS)
  wrong = {"layer": {"kernel": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match="do not match"):
    tx.update(wrong, state, PARAMS)


def test_mismatched_shapes_are_reported():
  tx = madam_optax.multiplicative_step()
  wrong = {"layer": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\].*\(3, 2\).*\(2, 3\)"):
    tx.update(wrong, tx.init(PARAMS), PARAMS)


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
  madam_optax.madam(learning_rate=lambda count: 0.01 * 0.5 ** count)
  madam_optax.madam(learning_rate=jnp.asarray(0.02))


def test_labels_need_concrete_params():
  import jax
  with pytest.raises(ValueError, match="concrete initial parameters"):
    jax.jit(madam_optax.multiplicative_labels)(PARAMS)


@pytest.mark.parametrize("make, what", [
    (madam_optax.clip_weight_magnitude, "bounds"),
    (lambda: madam_optax.log_quantise(madam_optax.LNSFormat.spanning(127)),
     "bounds"),
])
def test_per_tensor_state_from_another_tree(make, what):
  tx = make()
  state = tx.init({"w": jnp.ones(3)})
  params = {"w": jnp.ones(3), "v": jnp.ones(2)}
  with pytest.raises(ValueError, match=f"state holds 1 {what} but params "
                     "have 2 tensors"):
    tx.update(params, state, params)
