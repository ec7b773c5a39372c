"""Tests of the log_quantise transform (float params projected onto the LNS grid)."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import madam_optax
from madam_optax import LNSFormat


def _assert_on_grid(w, scale, fmt, prev=None):
  """Each entry is 0 or +-scale*base**-k, k integer in 0..levels-1, up to the
  round-off of optax.apply_updates (a few ulps of the larger of the old and
  new weights, since it computes w + (w' - w))."""
  w = np.asarray(w, np.float64)
  big = max(scale, 0.0 if prev is None else float(np.abs(prev).max()))
  atol = 4 * np.finfo(np.float32).eps * big
  nz = w != 0
  k = np.round(np.log(scale / np.abs(w[nz])) / fmt.log_base)
  assert np.all((k >= 0) & (k <= fmt.levels - 1))
  grid = np.sign(w[nz]) * scale * np.exp(-k * fmt.log_base)
  np.testing.assert_allclose(w[nz], grid, rtol=1e-5, atol=atol)


@given(levels=st.integers(2, 4096), log_range=st.floats(0.5, 10.0),
       rounding=st.sampled_from(["nearest", "stochastic"]),
       seed=st.integers(0, 1000))
def test_output_always_on_grid(levels, log_range, rounding, seed):
  fmt = LNSFormat.spanning(levels, log_range)
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(40,)), jnp.float32)}
  tx = madam_optax.log_quantise(fmt, rounding=rounding, seed=seed)
  state = tx.init(params)
  scale = float(state.max_magnitude[0])
  for _ in range(3):
    u = {"w": jnp.asarray(rng.normal(size=(40,)) * 3, jnp.float32)}
    updates, state = tx.update(u, state, params)
    prev = params["w"]
    params = optax.apply_updates(params, updates)
    _assert_on_grid(params["w"], scale, fmt, prev)


def test_nearest_is_encode_then_decode():
  fmt = LNSFormat.spanning(64)
  w = jax.random.normal(jax.random.key(0), (200,))
  tx = madam_optax.log_quantise(fmt)
  state = tx.init({"w": w})
  u, _ = tx.update({"w": jnp.zeros_like(w)}, state, {"w": w})
  codes, scale = madam_optax.lns_encode(w, fmt)
  np.testing.assert_allclose(w + u["w"], madam_optax.lns_decode(codes, scale, fmt),
                             rtol=1e-6)


def test_stochastic_rounding_is_unbiased_in_the_level():
  # Every entry sits 0.3 of a level below grid level 5 (i.e. at level 5.3).
  # Tolerance: 5 standard errors of the mean of N Bernoulli(0.3) draws.
  fmt = LNSFormat(levels=16, base=2.0)
  n = 40_000
  x = jnp.full((n,), 2.0 ** -5.3)
  tx = madam_optax.log_quantise(fmt, rounding="stochastic", max_magnitude=1.0)
  state = tx.init({"w": jnp.ones(n)})
  means = []
  for _ in range(2):
    u, state = tx.update({"w": x - 1.0}, state, {"w": jnp.ones(n)})
    k = -np.log2(np.asarray(1.0 + u["w"], np.float64))
    assert set(np.round(k, 4)) <= {5.0, 6.0}
    means.append(k.mean())
  se = np.sqrt(0.3 * 0.7 / n)
  for m in means:
    assert abs(m - 5.3) < 5 * se, (m, se)
  assert means[0] != means[1]          # the key in the state moved on


def test_nearest_is_deterministic_and_rounds_half_a_level():
  fmt = LNSFormat(levels=16, base=2.0)
  tx = madam_optax.log_quantise(fmt, max_magnitude=1.0)
  w = {"w": jnp.array([2.0 ** -5.4, 2.0 ** -5.6, -(2.0 ** -20), 0.0])}
  state = tx.init(w)
  u, state = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
  np.testing.assert_allclose(w["w"] + u["w"],
                             [2.0 ** -5, 2.0 ** -6, -(2.0 ** -15), 0.0],
                             rtol=1e-6)


def test_projects_adam_under_jit():
  fmt = LNSFormat.spanning(32)
  params = {"w": jax.random.normal(jax.random.key(1), (5, 3))}
  tx = optax.chain(optax.adam(0.1), madam_optax.log_quantise(fmt))
  state = tx.init(params)
  scale = float(state[1].max_magnitude[0])

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: jnp.sum((p["w"] - 0.3) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(5):
    prev = params["w"]
    params, state = step(params, state)
  _assert_on_grid(params["w"], scale, fmt, prev)
  chex.assert_trees_all_equal_dtypes(state[1].max_magnitude, (jnp.float32(0),))


def test_errors():
  fmt = LNSFormat.spanning(16)
  with pytest.raises(ValueError, match="rounding"):
    madam_optax.log_quantise(fmt, rounding="up")
  with pytest.raises(ValueError, match=r"\['b'\].*all-zero"):
    madam_optax.log_quantise(fmt).init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="floating-point"):
    madam_optax.log_quantise(fmt).init({"w": jnp.ones(3, jnp.int8)})
  tx = madam_optax.log_quantise(fmt)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))
