"""Tests of lns_madam: Madam on integer LNS codes (SPEC §2)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax import LNSFormat


def numpy_integer_rule(codes0, grads, levels, b2=0.999, g_bound=10.0,
                       lr_factor=10):
  """SPEC §2's integer rule, written independently in float64 NumPy.

  k = levels - |c|; v = b2 v + (1 - b2) g^2; g_n = clip(g / sqrt(v / (1 -
  b2^t)), +-g_bound) with 0/0 = 0; k = clip(k + round(lr_factor * g_n *
  sign(w)), 0, levels - 1); the sign is kept.
  """
  c = np.asarray(codes0, np.int64)
  sign = np.sign(c)
  k = levels - np.abs(c)
  v = np.zeros(c.shape)
  history = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    v = b2 * v + (1 - b2) * g**2
    v_hat = v / (1 - b2**t)
    with np.errstate(invalid="ignore", divide="ignore"):
      g_n = np.where(v_hat > 0, g / np.sqrt(v_hat), 0.0)
    g_n = np.clip(g_n, -g_bound, g_bound)
    k = np.clip(k + np.round(lr_factor * g_n * sign).astype(np.int64), 0,
                levels - 1)
    history.append(np.where(sign == 0, 0, sign * (levels - k)))
  return history


def test_reference_mode_matches_numpy_integer_rule_exactly():
  fmt = madam_optax.REFERENCE_FORMAT
  rng = np.random.default_rng(0)
  n, steps = 600, 40
  codes0 = rng.integers(1, fmt.levels + 1, n) * rng.choice([-1, 1], n)
  codes0[:20] = 0                                        # exact zeros
  codes0[20:40] = np.sign(codes0[20:40]) * fmt.levels    # at the bound
  codes0[40:60] = np.sign(codes0[40:60])                 # at the bottom
  scales = rng.lognormal(0, 2, n)                        # varied magnitudes
  grads = [(rng.normal(size=n) * scales).astype(np.float32) for _ in range(steps)]
  for g in grads[5:15]:
    g[60:80] = 0.0                                       # 0/0 for a while
  grads[0][80:90] = 0.0
  grads[3][100:200] = 1e4                                # bursts: g_n > g_bound
  expected = numpy_integer_rule(codes0, grads, fmt.levels)

  tx = madam_optax.lns_madam_reference()
  codes = {"w": jnp.asarray(codes0, jnp.int16)}
  state = tx.init(codes)
  step = jax.jit(tx.update)
  hit_bounds = set()
  for t, g in enumerate(grads):
    u, state = step({"w": jnp.asarray(g)}, state, codes)
    codes = optax.apply_updates(codes, u)
    assert codes["w"].dtype == jnp.int16
    np.testing.assert_array_equal(np.asarray(codes["w"]), expected[t])
    hit_bounds |= set(np.abs(expected[t]).tolist()) & {1, fmt.levels}
  assert hit_bounds == {1, fmt.levels}           # both clamps exercised


def test_stochastic_level_step_is_unbiased():
  # lr / log(base) = 0.37 levels per unit of normalised gradient: with g_n = 1
  # every code moves by 0 or 1 level, 1 with probability 0.37. Tolerance: 5
  # standard errors of the mean over N codes.
  fmt = LNSFormat(levels=100, base=np.exp(0.01 / 0.37))
  n = 40_000
  tx = madam_optax.lns_level_step(fmt, 0.01, rounding="stochastic", seed=3)
  codes = {"w": jnp.full((n,), 50, jnp.int8)}
  state = tx.init(codes)
  se = np.sqrt(0.37 * 0.63 / n)
  means = []
  for _ in range(3):
    u, state = tx.update({"w": jnp.ones(n)}, state, codes)
    moves = -np.asarray(u["w"], np.int64)      # k grows: |c| shrinks
    assert set(np.unique(moves)) <= {0, 1}
    means.append(moves.mean())
    assert abs(moves.mean() - 0.37) < 5 * se, (moves.mean(), se)
  assert len(set(means)) == 3                  # fresh randomness each step


def test_nearest_level_step_steps_and_clamps():
  fmt = LNSFormat(levels=100, base=1.01)
  tx = madam_optax.lns_level_step(fmt, 0.03, rounding="nearest")
  codes = {"w": jnp.array([50, -50, 99, 2, 0], jnp.int8)}
  g = {"w": jnp.array([1.0, 1.0, -1.0, 2.0, 5.0])}
  u, _ = tx.update(g, tx.init(codes), codes)
  # 0.03 / log(1.01) = 3.015 levels per unit; |c| = levels - k.
  chex.assert_trees_all_equal(optax.apply_updates(codes, u),
                              {"w": jnp.array([47, -53, 100, 1, 0], jnp.int8)})


def _regression_problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(256, 16)).astype(np.float32)
  w_true = rng.normal(size=(16, 4)).astype(np.float32)
  y = np.tanh(x @ w_true)
  params = {"w1": jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32),
            "b1": jnp.zeros(32),
            "w2": jnp.asarray(rng.normal(size=(32, 4)) / 6, jnp.float32),
            "b2": jnp.zeros(4)}

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

  return params, loss, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("levels, dtype, rounding", [
    (127, jnp.int8, "stochastic"), (127, jnp.int8, "nearest"),
    (4096, jnp.int16, "stochastic")])
def test_codes_stay_integers_through_training(levels, dtype, rounding):
  params, loss, x, y = _regression_problem()
  fmt = LNSFormat.spanning(levels)
  codes, scales = madam_optax.lns_encode_tree(params, fmt)
  tx = madam_optax.with_additive_fallback(
      codes, madam_optax.lns_madam(fmt, rounding=rounding,
                                   state_dtype=jnp.bfloat16),
      optax.adam(1e-2))
  state = tx.init(codes)
  value_and_grad = madam_optax.lns_value_and_grad(loss, scales, fmt)

  @jax.jit
  def train_step(codes, state):
    value, grads = value_and_grad(codes, x, y)
    updates, state = tx.update(grads, state, codes)
    return optax.apply_updates(codes, updates), state, value

  first = codes
  losses = []
  for _ in range(200):
    codes, state, value = train_step(codes, state)
    losses.append(float(value))
    # Storage dtypes at every step, not only at the end.
    assert (codes["w1"].dtype, codes["w2"].dtype) == (dtype, dtype)
    assert (codes["b1"].dtype, codes["b2"].dtype) == (jnp.float32,) * 2
  for name in ("w1", "w2"):
    assert codes[name].dtype == dtype
    c = np.asarray(codes[name], np.int64)
    assert np.all((np.abs(c) >= 1) & (np.abs(c) <= levels))
    np.testing.assert_array_equal(np.sign(c), np.sign(np.asarray(first[name])))
    assert np.any(c != np.asarray(first[name]))
  for name in ("b1", "b2"):
    assert codes[name].dtype == jnp.float32
  rms = jax.tree.leaves(state)
  assert any(leaf.dtype == jnp.bfloat16 for leaf in rms)
  assert losses[-1] < 0.7 * losses[0], losses[::40]


def test_under_inject_hyperparams_and_schedule():
  fmt = LNSFormat.spanning(127)
  codes = {"w": jnp.arange(-60, 60, dtype=jnp.int8)}
  g = {"w": jnp.linspace(-1.0, 1.0, 120)}
  plain = madam_optax.lns_madam(fmt, 0.05, rounding="nearest")
  # The codes are int8: hyperparam_dtype keeps the injected rate a float.
  injected = optax.inject_hyperparams(
      madam_optax.lns_madam, static_args=("fmt", "rounding", "seed"),
      hyperparam_dtype=jnp.float32)(fmt=fmt, learning_rate=0.05,
                                    rounding="nearest")
  scheduled = madam_optax.lns_madam(fmt, optax.constant_schedule(0.05),
                                    rounding="nearest")
  out = [tx.update(g, tx.init(codes), codes)[0]["w"]
         for tx in (plain, injected, scheduled)]
  # The float32 and float64 routes to lr / log(base) may differ at a rounding
  # boundary; all entries here are far from one.
  chex.assert_trees_all_equal(out[0], out[1], out[2])
  assert out[0].dtype == jnp.int8


def test_flax_nnx_model_keeps_integer_weights():
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  fmt = LNSFormat.spanning(127)
  codes, scales = madam_optax.lns_encode_tree(nnx.state(model, nnx.Param), fmt)
  nnx.update(model, codes)                       # the model now stores int8
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = madam_optax.with_additive_fallback(
      params, madam_optax.lns_madam(fmt), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jnp.argmax(x[:, :3], axis=1)

  @nnx.jit
  def train_step(model, optimizer, scales):
    graphdef, codes, rest = nnx.split(model, nnx.Param, ...)

    def loss(w):
      logits = nnx.merge(graphdef, w, rest)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = madam_optax.lns_value_and_grad(loss, scales, fmt)(codes)
    optimizer.update(model, grads)
    return value

  losses = [float(train_step(model, optimizer, scales)) for _ in range(40)]
  assert model.l1.kernel[...].dtype == jnp.int8
  assert model.l2.kernel[...].dtype == jnp.int8
  assert model.l1.bias[...].dtype == jnp.float32
  assert losses[-1] < 0.7 * losses[0]


def test_errors():
  fmt = LNSFormat.spanning(127)
  tx = madam_optax.lns_madam(fmt)
  with pytest.raises(ValueError, match=r"\['b'\].*float32.*with_additive_fallback"):
    tx.init({"b": jnp.zeros(3)})
  big = madam_optax.lns_madam(LNSFormat.spanning(4096))
  with pytest.raises(ValueError, match="int8.*4096"):
    big.init({"w": jnp.ones(3, jnp.int8)})
  with pytest.raises(ValueError, match="rounding"):
    madam_optax.lns_madam(fmt, rounding="down")
  with pytest.raises(ValueError, match="params"):
    codes = {"w": jnp.ones(3, jnp.int8)}
    tx.update({"w": jnp.ones(3)}, tx.init(codes))


@pytest.mark.slow
def test_flax_nnx_sharded_params(eight_devices):
  # NNX copies a Param's sharding annotation onto optimizer-state leaves shaped
  # like it; per-tensor scalars must therefore not sit in a params-shaped tree.
  # Kernels sharded over a (2, 4) mesh: lns_madam keeps them int8 and sharded,
  # and log_quantise (its scales are a flat tuple) initialises and steps.
  nnx = pytest.importorskip("flax.nnx")
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), devices=eight_devices,
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                               ("data", "fsdp"))

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
        optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    assert model.l1.kernel[...].sharding.spec == P("data", "fsdp")

    # Integer codes: lns_madam through nnx.Optimizer.
    model = MLP(nnx.Rngs(0))
    codes, scales = madam_optax.lns_encode_tree(nnx.state(model, nnx.Param),
                                                fmt)
    nnx.update(model, codes)
    tx = madam_optax.with_additive_fallback(
        nnx.state(model, nnx.Param), madam_optax.lns_madam(fmt),
        optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, scales):
      graphdef, codes, rest = nnx.split(model, nnx.Param, ...)
      loss = lambda w: jnp.sum(nnx.merge(graphdef, w, rest)(x) ** 2)
      value, grads = madam_optax.lns_value_and_grad(loss, scales, fmt)(codes)
      optimizer.update(model, grads)
      return value

    first = np.asarray(model.l1.kernel[...])
    losses = [float(train_step(model, optimizer, scales)) for _ in range(5)]
    kernel = model.l1.kernel[...]
    assert kernel.dtype == jnp.int8
    assert kernel.sharding.spec == P("data", "fsdp")
    assert np.any(np.asarray(kernel) != first)
    assert losses[-1] < losses[0]
