"""Property tests (hypothesis) for the invariants of SPEC §1."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import madam_optax

N = 12
STEPS = 6
F32_MAX = float(np.finfo(np.float32).max)

finite_f32 = st.floats(-F32_MAX, F32_MAX, allow_nan=False, allow_infinity=False,
                       width=32)
moderate_f32 = st.floats(-1e3, 1e3, allow_nan=False, width=32)
# Weights: ordinary, zero and tiny (1e-20) values. XLA flushes float32
# subnormals to zero, so magnitudes below 1e-30 are left to the NaN-free test.
weights = hnp.arrays(np.float32, (N,), elements=st.one_of(
    moderate_f32, st.just(0.0), st.floats(-1e-20, 1e-20).map(np.float32).map(float)
).filter(lambda x: x == 0 or abs(x) >= 1e-30))
any_weights = hnp.arrays(np.float32, (N,), elements=finite_f32)
grads = hnp.arrays(np.float32, (STEPS, N), elements=finite_f32)
learning_rates = st.floats(1e-4, 1.0)


@functools.partial(jax.jit, static_argnames="p_scale")
def _trajectory(w0, grad_seq, lr, p_scale=3.0):
  """Runs madam for len(grad_seq) steps; returns (weights per step, bounds)."""
  tx = madam_optax.madam(learning_rate=lr, p_scale=p_scale)
  params = {"w": w0}
  state = tx.init(params)

  def step(carry, g):
    params, state = carry
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params["w"]

  _, ws = jax.lax.scan(step, (params, state), grad_seq)
  return ws, state[-1].max_magnitude[0]  # one bound per tensor, leaf order


@given(weights, grads, learning_rates)
def test_sign_never_changes_and_zeros_stay_zero(w0, grad_seq, lr):
  ws, _ = _trajectory(w0, grad_seq, lr)
  ws = np.asarray(ws)
  assert np.all(np.sign(ws) * np.sign(w0) >= 0), "a weight changed sign"
  np.testing.assert_array_equal(ws[:, w0 == 0], 0.0)
  # Weights of ordinary size never collapse to zero either.
  assert np.all(ws[:, np.abs(w0) > 1e-30] != 0)


@given(weights, grads, learning_rates, st.sampled_from([0.5, 1.0, 3.0]))
def test_magnitude_bound_always_holds(w0, grad_seq, lr, p_scale):
  ws, bound = _trajectory(w0, grad_seq, lr, p_scale=p_scale)
  assert np.all(np.abs(np.asarray(ws)) <= np.asarray(bound))
  expected = p_scale * np.sqrt(np.mean(w0.astype(np.float64) ** 2))
  # Bounds below float32's smallest normal number may flush to zero.
  np.testing.assert_allclose(float(bound), expected, rtol=1e-6,
                             atol=float(np.finfo(np.float32).tiny))


@given(any_weights, grads, learning_rates)
def test_no_nan_or_inf_from_finite_input(w0, grad_seq, lr):
  ws, bound = _trajectory(w0, grad_seq, lr)
  assert np.all(np.isfinite(np.asarray(ws)))
  assert np.isfinite(float(bound))


# XLA flushes float32 subnormals to zero; (1 - b2)**0.5 * g is subnormal for
# |g| below about 4e-37, and such gradients count as zero (documented).
normal_f32 = finite_f32.filter(lambda x: x == 0 or abs(x) >= 1e-30)


@given(hnp.arrays(np.float32, (N,), elements=normal_f32))
def test_first_normalised_gradient_is_exactly_sign(g):
  u = _first_normalised({"g": g})
  np.testing.assert_array_equal(np.asarray(u["g"]), np.sign(g))


@jax.jit
def _first_normalised(g):
  tx = madam_optax.scale_by_second_moment()
  return tx.update(g, tx.init(g))[0]


@given(weights, hnp.arrays(np.float32, (1, N), elements=normal_f32), learning_rates)
def test_first_madam_step_is_a_sign_step(w0, g, lr):
  ws, bound = _trajectory(w0, g, lr, p_scale=1e30)
  expected = w0.astype(np.float64) * np.exp(-lr * np.sign(g[0]) * np.sign(w0))
  np.testing.assert_allclose(np.asarray(ws[0]), expected, rtol=1e-6, atol=0)


@given(weights, grads, learning_rates)
def test_log_magnitude_moves_at_most_lr_times_g_bound(w0, grad_seq, lr):
  ws, _ = _trajectory(w0, grad_seq, lr, p_scale=1e30)
  prev = np.concatenate([w0[None], np.asarray(ws)[:-1]])
  cur = np.asarray(ws)
  mask = (np.abs(prev) > 1e-30) & (np.abs(cur) > 1e-30)
  step = np.abs(np.log(np.abs(cur[mask].astype(np.float64)))
                - np.log(np.abs(prev[mask].astype(np.float64))))
  assert np.all(step <= lr * 10.0 * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16,
                                   jnp.float64])
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
    w = (rng.choice([-1.0, 1.0], 20_000) * rng.uniform(2.0, top, 20_000)
         * 0.3).astype(dtype)
    tx = madam_optax.clip_weight_magnitude(max_magnitude=0.3)
    params = {"w": jnp.asarray(w)}
    updates, _ = tx.update({"w": jnp.zeros_like(params["w"])},
                           tx.init(params), params)
    new = optax.apply_updates(params, updates)["w"]
    bound = jnp.asarray(0.3, dtype)
    assert new.dtype == jnp.dtype(dtype)
    assert bool(jnp.all(jnp.abs(new) <= bound))
    np.testing.assert_array_equal(np.sign(np.asarray(new, np.float64)),
                                  np.sign(np.asarray(w, np.float64)))
    # Clipped to the bound, up to the rounding of ``bound - w`` (an ulp of w).
    slack = 2 * np.spacing(np.abs(w).astype(np.float64) if dtype == jnp.float64
                           else np.abs(np.asarray(w, np.float32)))
    if dtype in (jnp.bfloat16, jnp.float16):
      slack = 2 * np.abs(np.asarray(w, np.float64)) * float(jnp.finfo(dtype).eps)
    assert np.all(np.abs(np.asarray(new, np.float64)) >= float(bound) - slack)
