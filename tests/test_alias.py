"""The aliases: ``madam`` (SPEC §1) and ``lns_madam`` (SPEC §2) on their own.

``madam`` against the float64 NumPy reference over 200 steps, its first
step and per-step change in log|w|, its state, and its use under Optax's
wrappers; ``lns_madam`` and ``lns_madam_reference`` against the integer rule,
in training, and under ``inject_hyperparams`` and schedules. What every
transform shares is in ``test_contract.py`` and ``test_properties.py``.
"""

import chex
from hypothesis import given
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import integer_rule_reference
from reference import madam_reference
from strategies import N
from strategies import finite_f32
from strategies import learning_rates
from strategies import normal_f32
from strategies import weights
from transforms import BY_NAME

import madam_optax
from madam_optax import LNSFormat

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


# ============================================================ madam (SPEC §1)

STEPS = 200
# Bound on |w32 - w64| / |w64| at every one of 200 steps. The weight is the
# initial float32 value times a product of 200 per-step factors, each rounded
# at float32 epsilon (6e-8) a few times; rounding errors grow like a random
# walk. Measured: at most 1.7e-6 (about 14 float32 ulps) over 4 seeds x the 3
# configurations below; the bound leaves 2.3x headroom.
REL_BOUND = 4e-6

SHAPES = {
  "scalar": (),
  "vector": (7,),
  "matrix": (16, 9),
  "conv": (3, 3, 4, 5),
  "all_zero": (6,),
  "with_zeros": (5, 4),
}


def _initial_params(rng):
  p = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  p["all_zero"] = np.zeros(SHAPES["all_zero"], np.float32)
  p["with_zeros"][rng.random(SHAPES["with_zeros"]) < 0.3] = 0.0
  return p


def _gradients(rng, steps):
  """Random gradients mixing ordinary, zero, tiny (1e-20) and huge (1e6) values."""
  seq = []
  for t in range(steps):
    grads = {}
    for k, s in SHAPES.items():
      g = rng.standard_normal(s)
      scale = rng.choice([1.0, 0.0, 1e-20, 1e6], size=s, p=[0.7, 0.1, 0.1, 0.1])
      g = g * scale
      if t % 17 == 3:  # whole-tensor zero gradients now and then
        g = np.zeros(s)
      if k == "vector" and t < 5:  # zero gradients before the first real one
        g = np.zeros(s)
      grads[k] = np.asarray(g, np.float32)
    seq.append(grads)
  return seq


def _run_madam(tx, params, grads_seq):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for grads in grads_seq:
    params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
    history.append(jax.tree.map(np.asarray, params))
  return history


def _max_rel_error(ours, ref):
  worst = 0.0
  for k in ref:
    a = np.asarray(ours[k], np.float64)
    b = ref[k]
    zero = b == 0
    np.testing.assert_array_equal(a[zero], 0.0, err_msg=f"leaf {k}")
    if (~zero).any():
      worst = max(
        worst, float(np.max(np.abs(a[~zero] - b[~zero]) / np.abs(b[~zero])))
      )
  return worst


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"learning_rate": 0.1, "p_scale": 1.0, "g_bound": 2.0, "b2": 0.9},
    {"max_magnitude": 1.5, "b2": 0.99},
  ],
  ids=["defaults", "aggressive", "fixed-bound"],
)
def test_matches_float64_reference(seed, kwargs):
  rng = np.random.default_rng(seed)
  params = _initial_params(rng)
  grads_seq = _gradients(rng, STEPS)
  ours = _run_madam(madam_optax.madam(**kwargs), params, grads_seq)
  ref_kwargs = dict(kwargs)
  if "learning_rate" in ref_kwargs:
    ref_kwargs["lr"] = ref_kwargs.pop("learning_rate")
  ref = madam_reference(params, grads_seq, **ref_kwargs)
  worst = 0.0
  for t in range(STEPS):
    err = _max_rel_error(ours[t], ref[t])
    assert err <= REL_BOUND, f"step {t + 1}: relative error {err:.3g}"
    worst = max(worst, err)
  # The zero tensor and zero entries never moved.
  np.testing.assert_array_equal(ours[-1]["all_zero"], 0.0)


def test_matches_reference_with_schedule():
  rng = np.random.default_rng(3)
  params = _initial_params(rng)
  grads_seq = _gradients(rng, 60)
  schedule = optax.exponential_decay(0.05, transition_steps=10, decay_rate=0.5)
  ours = _run_madam(
    madam_optax.madam(learning_rate=schedule), params, grads_seq
  )
  ref = madam_reference(params, grads_seq, lr=schedule)
  assert _max_rel_error(ours[-1], ref[-1]) <= REL_BOUND


def test_relative_error_bound():
  """Reports the bound achieved (defaults, 200 steps); the documented figure."""
  rng = np.random.default_rng(11)
  params = _initial_params(rng)
  grads_seq = _gradients(rng, STEPS)
  ours = _run_madam(madam_optax.madam(), params, grads_seq)
  ref = madam_reference(params, grads_seq)
  worst = max(_max_rel_error(o, r) for o, r in zip(ours, ref))
  assert worst <= REL_BOUND, (
    f"worst relative error over {STEPS} steps: {worst:.3g}"
  )
  print(f"worst relative error over {STEPS} steps: {worst:.3g}")


# ----------------------------------------------- first step, per-step change

STEPS_H = 6  # steps of the hypothesis trajectories


@jax.jit
def _unbounded_trajectory(w0, grad_seq, lr):
  """Madam with p_scale 1e30 (no bound in reach): the weights per step."""
  tx = madam_optax.madam(learning_rate=lr, p_scale=1e30)
  params = {"w": w0}

  def step(carry, g):
    params, state = carry
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params["w"]

  return jax.lax.scan(step, (params, tx.init(params)), grad_seq)[1]


@given(
  weights,
  hnp.arrays(np.float32, (STEPS_H, N), elements=normal_f32),
  learning_rates,
)
def test_first_madam_step_is_a_sign_step(w0, grad_seq, lr):
  """Step 1 is ``w * exp(-lr sign(g) sign(w))`` (SPEC §1: g_n = sign(g))."""
  ws = np.asarray(_unbounded_trajectory(w0, grad_seq, lr))
  expected = w0.astype(np.float64) * np.exp(
    -lr * np.sign(grad_seq[0]) * np.sign(w0)
  )
  np.testing.assert_allclose(ws[0], expected, rtol=1e-6, atol=0)


@given(
  weights,
  hnp.arrays(np.float32, (STEPS_H, N), elements=finite_f32),
  learning_rates,
)
def test_log_magnitude_moves_at_most_lr_times_g_bound(w0, grad_seq, lr):
  ws = np.asarray(_unbounded_trajectory(w0, grad_seq, lr))
  prev = np.concatenate([w0[None], ws[:-1]])
  mask = (np.abs(prev) > 1e-30) & (np.abs(ws) > 1e-30)
  step = np.abs(
    np.log(np.abs(ws[mask].astype(np.float64)))
    - np.log(np.abs(prev[mask].astype(np.float64)))
  )
  assert np.all(step <= lr * 10.0 * (1 + 1e-5) + 1e-6)


# --------------------------------------------------- Rosenbrock, off-valley


def test_madam_minimises_rosenbrock_from_off_the_valley():
  params = {"xy": jnp.array([1.5, 2.0])}  # same signs as the optimum (1, 1)

  def rosenbrock(p):
    x, y = p["xy"]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2

  # Constant lr 0.01 "jitters" near the optimum (loss ~2e-2); decaying it, as
  # the paper advises, converges.
  tx = madam_optax.madam(
    learning_rate=optax.cosine_decay_schedule(0.01, 10_000)
  )
  state = tx.init(params)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(
    lambda c: jax.lax.scan(step, c, None, length=10_000)
  )((params, state))
  assert rosenbrock(params) < 1e-3


# ------------------------------------------------------------ state, wrappers

MADAM = BY_NAME["madam"]


def _run(tx, params, steps=5):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, MADAM.example_grads(params, i))
  return params, state


def test_inject_hyperparams_learning_rate_can_change_between_steps():
  params = MADAM.example_params()
  tx = optax.inject_hyperparams(madam_optax.madam)(learning_rate=0.01)
  state = tx.init(params)
  grads = MADAM.example_grads(params, 0)
  update = jax.jit(tx.update)
  updates_small, _ = update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  updates_big, _ = update(grads, state, params)
  ratio = jnp.abs(updates_big["scale"] / updates_small["scale"])
  assert 9.0 < ratio < 11.0


def test_multisteps_update_is_madam_of_the_mean_gradient():
  params = MADAM.example_params()
  every_k = optax.MultiSteps(madam_optax.madam(), every_k_schedule=2)
  state = every_k.init(params)
  g0, g1 = MADAM.example_grads(params, 0), MADAM.example_grads(params, 1)
  u0, state = every_k.update(g0, state, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, params))
  u1, state = every_k.update(g1, state, params)
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  plain = madam_optax.madam()
  expected, _ = plain.update(mean_grad, plain.init(params), params)
  chex.assert_trees_all_close(u1, expected, rtol=1e-6)


def test_apply_if_finite_skips_non_finite_steps():
  params = MADAM.example_params()
  tx = optax.apply_if_finite(madam_optax.madam(), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.notfinite_count) == 1
  updates, state = jax.jit(tx.update)(
    MADAM.example_grads(params, 0), state, params
  )
  assert int(state.notfinite_count) == 0
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("state_dtype", [jnp.bfloat16, jnp.float32])
def test_state_dtype_is_selectable(state_dtype):
  params = MADAM.example_params()
  tx = madam_optax.madam(state_dtype=state_dtype)
  _, state = _run(tx, params)
  for leaf in jax.tree.leaves(state[0].rms_hat):
    assert leaf.dtype == state_dtype
  # bf16 state tracks the fp32 trajectory closely.
  fp32, _ = _run(madam_optax.madam(), params)
  bf16, _ = _run(tx, params)
  chex.assert_trees_all_close(fp32, bf16, rtol=2e-2)


def test_state_is_one_buffer_plus_scalars():
  params = MADAM.example_params()
  state = madam_optax.madam().init(params)
  second_moment, clip_state, step_state, bound_state = state
  chex.assert_trees_all_equal_shapes(second_moment.rms_hat, params)
  others = (second_moment.count, clip_state, step_state, bound_state)
  assert all(x.ndim == 0 for x in jax.tree.leaves(others))


# ======================================================= lns_madam (SPEC §2)


def test_reference_mode_matches_the_integer_rule_exactly():
  fmt = madam_optax.REFERENCE_FORMAT
  rng = np.random.default_rng(0)
  n, steps = 600, 40
  codes0 = rng.integers(1, fmt.levels + 1, n) * rng.choice([-1, 1], n)
  codes0[:20] = 0  # exact zeros
  codes0[20:40] = np.sign(codes0[20:40]) * fmt.levels  # at the bound
  codes0[40:60] = np.sign(codes0[40:60])  # at the bottom
  scales = rng.lognormal(0, 2, n)  # varied magnitudes
  grads = [
    (rng.normal(size=n) * scales).astype(np.float32) for _ in range(steps)
  ]
  for g in grads[5:15]:
    g[60:80] = 0.0  # 0/0 for a while
  grads[0][80:90] = 0.0
  grads[3][100:200] = 1e4  # bursts: g_n > g_bound
  # lr / log(base) = 0.01 / 0.001: SPEC §2's round(10 g_n).
  expected = integer_rule_reference(
    codes0, grads, levels=fmt.levels, levels_per_unit=10
  )

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
  assert hit_bounds == {1, fmt.levels}  # both clamps exercised


def _regression_problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(256, 16)).astype(np.float32)
  w_true = rng.normal(size=(16, 4)).astype(np.float32)
  y = np.tanh(x @ w_true)
  params = {
    "w1": jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32),
    "b1": jnp.zeros(32),
    "w2": jnp.asarray(rng.normal(size=(32, 4)) / 6, jnp.float32),
    "b2": jnp.zeros(4),
  }

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

  return params, loss, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize(
  "levels, dtype, rounding",
  [
    (127, jnp.int8, "stochastic"),
    (127, jnp.int8, "nearest"),
    (4096, jnp.int16, "stochastic"),
  ],
)
def test_codes_stay_integers_through_training(levels, dtype, rounding):
  params, loss, x, y = _regression_problem()
  fmt = LNSFormat.spanning(levels)
  codes, max_magnitudes = madam_optax.lns_encode_tree(params, fmt)
  tx = madam_optax.with_additive_fallback(
    codes,
    madam_optax.lns_madam(fmt, rounding=rounding, state_dtype=jnp.bfloat16),
    optax.adam(1e-2),
  )
  state = tx.init(codes)
  value_and_grad = madam_optax.lns_value_and_grad(loss, max_magnitudes, fmt)

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


def test_lns_madam_under_inject_hyperparams_and_schedule():
  fmt = LNSFormat.spanning(127)
  codes = {"w": jnp.arange(-60, 60, dtype=jnp.int8)}
  g = {"w": jnp.linspace(-1.0, 1.0, 120)}
  plain = madam_optax.lns_madam(fmt, 0.05, rounding="nearest")
  # The codes are int8: hyperparam_dtype keeps the injected rate a float.
  injected = optax.inject_hyperparams(
    madam_optax.lns_madam,
    static_args=("fmt", "rounding", "seed"),
    hyperparam_dtype=jnp.float32,
  )(fmt, learning_rate=0.05, rounding="nearest")
  scheduled = madam_optax.lns_madam(
    fmt, optax.constant_schedule(0.05), rounding="nearest"
  )
  out = [
    tx.update(g, tx.init(codes), codes)[0]["w"]
    for tx in (plain, injected, scheduled)
  ]
  # The float32 and float64 routes to lr / log(base) may differ at a rounding
  # boundary; all entries here are far from one.
  chex.assert_trees_all_equal(out[0], out[1], out[2])
  assert out[0].dtype == jnp.int8


def test_lns_madam_errors():
  fmt = LNSFormat.spanning(127)
  tx = madam_optax.lns_madam(fmt)
  with pytest.raises(
    ValueError, match=r"\['b'\].*float32.*with_additive_fallback"
  ):
    tx.init({"b": jnp.zeros(3)})
  big = madam_optax.lns_madam(LNSFormat.spanning(4096))
  with pytest.raises(ValueError, match="int8.*4096"):
    big.init({"w": jnp.ones(3, jnp.int8)})
  with pytest.raises(ValueError, match="rounding"):
    madam_optax.lns_madam(fmt, rounding="down")
  with pytest.raises(ValueError, match="params"):
    codes = {"w": jnp.ones(3, jnp.int8)}
    tx.update({"w": jnp.ones(3)}, tx.init(codes))
