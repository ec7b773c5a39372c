"""``clip_weight_magnitude``: SPEC steps 1 and 7, a per-tensor bound.

Its share of the contract and of the invariants (the bound holds step after
step) runs from the registry (``test_contract.py``, ``test_properties.py``).
"""

import warnings

from hypothesis import given
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import N
from strategies import finite_f32
from strategies import weights

import madam_optax

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


@jax.jit
def _bound(w0, p_scale):
  tx = madam_optax.clip_weight_magnitude(p_scale)
  return tx.init({"w": w0}).max_magnitude["w"]  # one bound per tensor


@given(weights, st.sampled_from([0.5, 1.0, 3.0]))
def test_bound_is_p_scale_times_the_initial_rms(w0, p_scale):
  bound = float(_bound(w0, p_scale))
  expected = p_scale * np.sqrt(np.mean(w0.astype(np.float64) ** 2))
  # Bounds below float32's smallest normal number may flush to zero.
  np.testing.assert_allclose(
    bound, expected, rtol=1e-6, atol=float(np.finfo(np.float32).tiny)
  )


@given(hnp.arrays(np.float32, (N,), elements=finite_f32))
def test_bound_is_finite_for_any_finite_weights(w0):
  assert np.isfinite(float(_bound(w0, 3.0)))


@pytest.mark.parametrize("magnitude", [1e38, 3e38])
def test_bound_of_huge_weights(magnitude):
  """The RMS once divided by max|w0|: above 2**126 the reciprocal was
  subnormal, flushed to zero, and the bound came out 0."""
  w0 = np.full((N,), magnitude, np.float32)
  np.testing.assert_allclose(float(_bound(w0, 0.5)), 0.5 * magnitude, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_bound_below_the_normal_range_is_not_flushed_to_zero(dtype):
  """p_scale times an RMS of 4.7e-38 is a float32 subnormal, which XLA
  flushed to 0: clip_weight_magnitude then zeroed the tensor. The bound is
  at least float32's smallest normal value."""
  tiny = float(np.finfo(np.float32).tiny)
  w = {"w": jnp.full((3,), 4 * tiny, dtype)}
  bound = madam_optax.initial_max_magnitude(w, p_scale=1e-3)["w"]
  assert float(bound) == tiny
  tx = madam_optax.clip_weight_magnitude(p_scale=1e-3)
  u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, w), tx.init(w), w)
  after = optax.apply_updates(w, u)["w"]
  assert np.all(np.asarray(after, np.float64) > 0), after


@pytest.mark.parametrize("tx_name", ["clip_weight_magnitude", "madam"])
def test_a_float16_bound_below_float16s_range_is_not_rounded_to_zero(tx_name):
  """p_scale times an RMS of 3e-5 is 3e-8, below float16's smallest
  subnormal value (6e-8): in float16 the bound rounded to 0, and
  clip_weight_magnitude and madam zeroed the tensor. A float16 tensor's
  bound is at least that smallest subnormal value."""
  smallest = float(jnp.finfo(jnp.float16).smallest_subnormal)
  w = {"w": jnp.full((3,), 3e-5, jnp.float16)}
  bound = madam_optax.initial_max_magnitude(w, p_scale=1e-3)["w"]
  assert float(bound) == smallest
  tx = getattr(madam_optax, tx_name)(p_scale=1e-3)
  u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, w), tx.init(w), w)
  after = np.asarray(optax.apply_updates(w, u)["w"], np.float64)
  np.testing.assert_array_equal(after, smallest)


@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
)
def test_bound_is_exact_after_additive_apply_far_outside(dtype):
  """|w + delta| <= bound bit-exactly when |w| > 2 * bound (bound - w rounds).

  Factors up to 8 (initial weights beyond 3 RMS are rarely more than twice the
  bound); in float32/64 also up to 500. Further out, low-precision weights
  meet the limit of additive updates: in bfloat16 ``0.3 - 500`` rounds to
  ``-500``, so the bound still holds but the weight lands on zero.
  """
  rng = np.random.default_rng(0)
  top = 8.0 if dtype in (jnp.bfloat16, jnp.float16) else 500.0
  with jax.enable_x64(dtype == jnp.float64):
    w = (
      rng.choice([-1.0, 1.0], 20_000) * rng.uniform(2.0, top, 20_000) * 0.3
    ).astype(dtype)
    tx = madam_optax.clip_weight_magnitude(max_magnitude=0.3)
    params = {"w": jnp.asarray(w)}
    updates, _ = jax.jit(tx.update)(
      {"w": jnp.zeros_like(params["w"])}, tx.init(params), params
    )
    new = optax.apply_updates(params, updates)["w"]
    bound = jnp.asarray(0.3, dtype)
    assert new.dtype == jnp.dtype(dtype)
    assert bool(jnp.all(jnp.abs(new) <= bound))
    np.testing.assert_array_equal(
      np.sign(np.asarray(new, np.float64)), np.sign(np.asarray(w, np.float64))
    )
    # Clipped to the bound, up to the rounding of ``bound - w`` (an ulp of w).
    slack = 2 * np.spacing(
      np.abs(w).astype(np.float64)
      if dtype == jnp.float64
      else np.abs(np.asarray(w, np.float32))
    )
    if dtype in (jnp.bfloat16, jnp.float16):
      slack = (
        2 * np.abs(np.asarray(w, np.float64)) * float(jnp.finfo(dtype).eps)
      )
    assert np.all(np.abs(np.asarray(new, np.float64)) >= float(bound) - slack)


def test_bounds_sgd_while_it_minimises_a_parabola():
  tx = optax.chain(
    optax.identity(), optax.sgd(0.5), madam_optax.clip_weight_magnitude()
  )
  target = jnp.array([0.5, -2.0, 3.0])
  params = {"w": jnp.array([1.0, -1.0, 1.0])}
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  initial = loss(params)
  for _ in range(300):
    params, state = step(params, state)
  assert jnp.all(jnp.abs(params["w"]) <= 3.0)  # 3 * RMS(1, -1, 1)
  assert loss(params) < 0.1 * initial


# deprecated alias: initial_rms_bound and lns_scale give the per-tensor bound
# p_scale * sqrt(mean(w0**2)) under their old names, for one release.
def test_deprecated_bound_aliases_agree():
  w = jnp.array([3.0, -4.0])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    tree = madam_optax.initial_rms_bound({"w": w}, 2.0)
    single = madam_optax.lns_scale(w, p_scale=2.0)
  np.testing.assert_allclose(tree["w"], 2.0 * np.sqrt(12.5), rtol=1e-6)
  np.testing.assert_allclose(single, 2.0 * np.sqrt(12.5), rtol=1e-6)
