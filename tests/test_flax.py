"""Through Flax: NNX's ``nnx.Optimizer`` and linen's ``TrainState``.

Float Madam (plain and with the additive fallback), bfloat16 params, and
``lns_madam`` on a model whose weights are stored as int8 codes, on one
device and on 8 simulated devices (``conftest.py``).
"""

import jax
import jax.numpy as jnp
from meshes import make_mesh
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax import LNSFormat

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
      params, madam_optax.madam(), optax.adam(1e-2)
    )

  model, losses = _nnx_train(tx_fn)
  assert losses[-1] < 0.3 * losses[0]
  assert jnp.any(model.l1.bias[...] != 0)


def test_nnx_param_dtype_bf16_preserved():
  model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, madam_optax.madam(), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3), jnp.bfloat16)) ** 2))(
    model
  )
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
    apply_fn=net.apply,
    params=params,
    tx=madam_optax.with_additive_fallback(params, madam_optax.madam()),
  )

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


# ------------------------------------------------ LNS codes in an NNX model


def test_flax_nnx_model_keeps_integer_weights():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  fmt = LNSFormat.spanning(127)
  codes, max_magnitudes = madam_optax.lns_encode_tree(
    nnx.state(model, nnx.Param), fmt
  )
  nnx.update(model, codes)  # the model now stores int8
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = madam_optax.with_additive_fallback(
    params, madam_optax.lns_madam(fmt), optax.adam(1e-2)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jnp.argmax(x[:, :3], axis=1)

  @nnx.jit
  def train_step(model, optimizer, max_magnitudes):
    graphdef, codes, rest = nnx.split(model, nnx.Param, ...)

    def loss(w):
      logits = nnx.merge(graphdef, w, rest)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = madam_optax.lns_value_and_grad(loss, max_magnitudes, fmt)(
      codes
    )
    optimizer.update(model, grads)
    return value

  losses = [
    float(train_step(model, optimizer, max_magnitudes)) for _ in range(40)
  ]
  assert model.l1.kernel[...].dtype == jnp.int8
  assert model.l2.kernel[...].dtype == jnp.int8
  assert model.l1.bias[...].dtype == jnp.float32
  assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_flax_nnx_sharded_params(eight_devices):
  # NNX copies a Param's sharding annotation onto optimizer-state leaves shaped
  # like it; per-tensor scalars must therefore not sit in a params-shaped tree.
  # Kernels sharded over a (2, 4) mesh: lns_madam keeps them int8 and sharded,
  # and log_quantise (its per-tensor scalars are a flat tuple) initialises and
  # steps.
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  mesh = make_mesh(eight_devices)
  init = nnx.with_partitioning(
    nnx.initializers.lecun_normal(), ("data", "fsdp")
  )

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)
      self.l2 = nnx.Linear(16, 8, kernel_init=init, rngs=rngs)

    def __call__(self, x):
      h = jax.sharding.reshard(nnx.relu(self.l1(x)), P())
      return self.l2(h)

  fmt = LNSFormat.spanning(127)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  with jax.set_mesh(mesh):
    # Float params on the grid: madam, then log_quantise, biases additive.
    model = MLP(nnx.Rngs(0))
    tx = madam_optax.with_additive_fallback(
      nnx.state(model, nnx.Param),
      optax.chain(madam_optax.madam(), madam_optax.log_quantise(fmt)),
      optax.adam(1e-2),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    assert model.l1.kernel[...].sharding.spec == P("data", "fsdp")

    # Integer codes: lns_madam through nnx.Optimizer.
    model = MLP(nnx.Rngs(0))
    codes, max_magnitudes = madam_optax.lns_encode_tree(
      nnx.state(model, nnx.Param), fmt
    )
    nnx.update(model, codes)
    tx = madam_optax.with_additive_fallback(
      nnx.state(model, nnx.Param), madam_optax.lns_madam(fmt), optax.adam(1e-2)
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, max_magnitudes):
      graphdef, codes, rest = nnx.split(model, nnx.Param, ...)
      loss = lambda w: jnp.sum(nnx.merge(graphdef, w, rest)(x) ** 2)
      value, grads = madam_optax.lns_value_and_grad(loss, max_magnitudes, fmt)(
        codes
      )
      optimizer.update(model, grads)
      return value

    first = np.asarray(model.l1.kernel[...])
    losses = [
      float(train_step(model, optimizer, max_magnitudes)) for _ in range(5)
    ]
    kernel = model.l1.kernel[...]
    assert kernel.dtype == jnp.int8
    assert kernel.sharding.spec == P("data", "fsdp")
    assert np.any(np.asarray(kernel) != first)
    assert losses[-1] < losses[0]
