"""Property tests (hypothesis) for the invariants of SPEC §1."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
