"""Madam through Flax: NNX's `nnx.Optimizer` and linen's `TrainState`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax

nnx = pytest.importorskip("flax.nnx")


def _regression_data(n=128):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, 4)).astype(np.float32)
  y = np.tanh(x @ rng.standard_normal((4, 1))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _nnx_train(tx_fn, steps=200):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx_fn(model), wrt=nnx.Param)
  x, y = _regression_data()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return model, losses


def test_nnx_optimizer_trains_with_plain_madam():
  model, losses = _nnx_train(lambda model: madam_optax.madam())
  assert losses[-1] < 0.3 * losses[0]
  # Flax's zero-initialised biases never moved under plain Madam.
  np.testing.assert_array_equal(model.l1.bias[...], 0.0)


def test_nnx_optimizer_with_additive_fallback_moves_biases():
  def tx_fn(model):
    params = nnx.state(model, nnx.Param)
    return madam_optax.with_additive_fallback(
        params, madam_optax.madam(), optax.adam(1e-2))

  model, losses = _nnx_train(tx_fn)
  assert losses[-1] < 0.3 * losses[0]
  assert jnp.any(model.l1.bias[...] != 0)


def test_nnx_param_dtype_bf16_preserved():
  model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, madam_optax.madam(), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3), jnp.bfloat16)) ** 2))(model)
  optimizer.update(model, grads)
  assert model.kernel[...].dtype == jnp.bfloat16


def test_linen_train_state():
  linen = pytest.importorskip("flax.linen")
  from flax.training import train_state

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(1)(jax.nn.relu(linen.Dense(16)(x)))

  x, y = _regression_data()
  net = Net()
  params = net.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(
      apply_fn=net.apply, params=params,
      tx=madam_optax.with_additive_fallback(params, madam_optax.madam()))

  @jax.jit
  def step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(200):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0]
