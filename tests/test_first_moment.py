"""Madam's optional first moment (SPEC "Beyond the paper"): ``b1``.

``scale_by_moments`` gives Adam's bias-corrected ``m_hat / sqrt(v_hat)``
without epsilon; ``madam(b1=...)`` and ``lns_madam(b1=...)`` put it in the
second moment's place. Held here: ``b1 = 0`` (a Python number) is today's
Madam bit for bit (state, compiled program, numbers); the fused step equals
the chain of parts bit for bit for ``b1 > 0`` too; the first step is still
exactly a sign step; float64 and float32 runs follow the float64 NumPy
oracle (``tests/reference.py``); ``inject_hyperparams`` over four dtypes;
non-finite gradients; validation. The registry (``transforms.py``) adds the
contract, property and sharding checks of ``scale_by_moments``,
``madam_b1`` and ``lns_madam_b1``.
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import integer_rule_reference
from reference import madam_reference
from test_fused_madam import _assert_same
from test_fused_madam import _gradients
from test_fused_madam import _tree

import madam_optax

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


def chain_of_parts(
  learning_rate=0.01,
  *,
  p_scale=3.0,
  g_bound=10.0,
  b2=0.999,
  b1=0.9,
  state_dtype=None,
  mu_dtype=None,
  max_magnitude=None,
):
  """Madam with a first moment as the chain of its public parts."""
  return optax.chain(
    madam_optax.scale_by_moments(
      b1, b2, state_dtype=state_dtype, mu_dtype=mu_dtype
    ),
    optax.clip(g_bound),
    madam_optax.multiplicative_step(learning_rate),
    madam_optax.clip_weight_magnitude(p_scale, max_magnitude=max_magnitude),
  )


def _run_against_chain(params, kwargs, steps=8, seed=0, bad=0.0):
  kwargs = {"b1": 0.9, **kwargs}
  fused, chained = madam_optax.madam(**kwargs), chain_of_parts(**kwargs)
  state = fused.init(params)
  _assert_same(state, chained.init(params), "init")
  assert isinstance(state[0], madam_optax.ScaleByMomentsState)
  fused_step, chained_step = jax.jit(fused.update), jax.jit(chained.update)
  rng = np.random.default_rng(seed)
  for t in range(steps):
    grads = _gradients(rng, params, bad)
    u_f, s_f = fused_step(grads, state, params)
    u_c, s_c = chained_step(grads, state, params)
    _assert_same(u_f, u_c, f"updates at step {t + 1}")
    _assert_same(s_f, s_c, f"state at step {t + 1}")
    params, state = optax.apply_updates(params, u_f), s_f


SETTINGS = {
  "defaults": {},
  "short_step": {"learning_rate": 0.1, "g_bound": 2.0, "b2": 0.9, "b1": 0.5},
  "long_step": {"learning_rate": 0.5},
  "schedule": {"learning_rate": optax.exponential_decay(0.05, 5, 0.5)},
  "fixed_bound": {"max_magnitude": 0.3},
  "bf16_state": {"state_dtype": jnp.bfloat16},
  "bf16_mu": {"mu_dtype": jnp.bfloat16},
  "array_hyperparameters": {
    "learning_rate": jnp.asarray(0.02),
    "g_bound": jnp.asarray(5.0),
    "b1": jnp.asarray(0.8),
  },
}


NARROW_SETTINGS = ("defaults", "bf16_mu", "array_hyperparameters")


@pytest.mark.parametrize(
  "setting, dtype",
  [(s, jnp.float32) for s in SETTINGS]
  + [(s, d) for s in NARROW_SETTINGS for d in (jnp.bfloat16, jnp.float16)],
)
def test_fused_equals_chain_leaf_for_leaf(setting, dtype):
  params = _tree(np.random.default_rng(1), dtype)
  _run_against_chain(params, SETTINGS[setting])


def test_fused_equals_chain_with_nan_and_inf_gradients():
  params = _tree(np.random.default_rng(7), jnp.float32)
  _run_against_chain(params, {}, bad=0.05)


def test_fused_equals_chain_in_float64():
  with jax.enable_x64(True):
    params = _tree(np.random.default_rng(2), jnp.float64)
    _run_against_chain(params, SETTINGS["schedule"], bad=0.02)


def test_fused_equals_chain_under_masked_and_none_leaves():
  params = _tree(np.random.default_rng(4), jnp.float32)
  mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  fused = optax.masked(madam_optax.madam(b1=0.9), mask)
  chained = optax.masked(chain_of_parts(), mask)
  state = fused.init(params)
  _assert_same(state, chained.init(params), "init")
  grads = _gradients(np.random.default_rng(5), params)
  _assert_same(
    jax.jit(fused.update)(grads, state, params),
    jax.jit(chained.update)(grads, state, params),
    "masked",
  )
  with_none = {"w": jnp.ones((4, 3)), "absent": None}
  tx = madam_optax.madam(b1=0.9)
  u, state = tx.update(
    {"w": jnp.ones((4, 3)), "absent": None}, tx.init(with_none), with_none
  )
  assert u["absent"] is None and state[0].mu["absent"] is None


# ---------------------------------------------------- b1 = 0 is today's Madam


def test_b1_zero_is_todays_madam_state_program_and_numbers():
  """``b1=0.0`` (a Python number): the state's tree (a checkpoint of
  today's ``madam()`` restores into it), the compiled program's text and
  every number are those of ``madam()``."""
  params = _tree(np.random.default_rng(3), jnp.float32)
  today, with_b1 = madam_optax.madam(), madam_optax.madam(b1=0.0)
  state = today.init(params)
  assert jax.tree.structure(with_b1.init(params)) == jax.tree.structure(state)
  assert isinstance(state[0], madam_optax.ScaleBySecondMomentState)
  grads = _gradients(np.random.default_rng(4), params)
  compiled = [
    jax.jit(tx.update).lower(grads, state, params).compile().as_text()
    for tx in (today, with_b1)
  ]
  assert compiled[0] == compiled[1]
  for b1 in (None, 0, 0.0, np.float32(0)):
    _assert_same(
      jax.jit(madam_optax.madam(b1=b1).update)(grads, state, params),
      jax.jit(today.update)(grads, state, params),
      f"b1={b1!r}",
    )
  assert jax.tree.structure(
    madam_optax.lns_madam(madam_optax.LNSFormat.spanning(127), b1=0.0).init(
      {"w": jnp.ones(3, jnp.int8)}
    )
  ) == jax.tree.structure(
    madam_optax.lns_madam(madam_optax.LNSFormat.spanning(127)).init(
      {"w": jnp.ones(3, jnp.int8)}
    )
  )


def test_inject_hyperparams_without_b1_keeps_todays_state():
  """``b1`` defaults to None, which ``inject_hyperparams`` does not inject
  (it would inject a numeric default as an array, adding the buffer)."""
  params = {"w": jnp.ones((3, 2))}
  state = optax.inject_hyperparams(madam_optax.madam)(learning_rate=0.1).init(
    params
  )
  assert "b1" not in state.hyperparams
  assert jax.tree.structure(state.inner_state) == jax.tree.structure(
    madam_optax.madam().init(params)
  )


def test_an_array_b1_of_zero_keeps_the_buffer_and_todays_numbers():
  """An array ``b1`` (as ``inject_hyperparams`` gives) always keeps ``mu``;
  at 0 its updates and second moments are today's bit for bit."""
  params = _tree(np.random.default_rng(5), jnp.float32)
  today, zero = madam_optax.madam(), madam_optax.madam(b1=jnp.asarray(0.0))
  s_today, s_zero = today.init(params), zero.init(params)
  assert isinstance(s_zero[0], madam_optax.ScaleByMomentsState)
  rng = np.random.default_rng(6)
  for t in range(5):
    grads = _gradients(rng, params, bad=0.02)
    u_t, s_today = jax.jit(today.update)(grads, s_today, params)
    u_z, s_zero = jax.jit(zero.update)(grads, s_zero, params)
    _assert_same(u_z, u_t, f"updates at step {t + 1}")
    _assert_same(s_zero[0].rms_hat, s_today[0].rms_hat, f"rms at step {t + 1}")
    params = optax.apply_updates(params, u_t)


# ---------------------------------------------------------------- the maths

N = 12
F32_MAX = float(np.finfo(np.float32).max)
normal_f32 = st.floats(
  -F32_MAX, F32_MAX, allow_nan=False, allow_infinity=False, width=32
).filter(lambda x: x == 0 or abs(x) >= 1e-30)


@jax.jit
def _first_direction(g):
  tx = madam_optax.scale_by_moments(b1=0.9)
  return tx.update(g, tx.init(g))[0]


@hypothesis.given(hnp.arrays(np.float32, (N,), elements=normal_f32))
def test_first_direction_is_exactly_sign(g):
  """m_hat_1 = g_1 exactly (the bias-corrected EMA's first weight is 0)."""
  np.testing.assert_array_equal(
    np.asarray(_first_direction({"g": g})["g"]), np.sign(g)
  )


def test_first_madam_step_with_b1_is_todays_sign_step():
  rng = np.random.default_rng(8)
  params = _tree(rng, jnp.float32)
  grads = jax.tree.map(
    lambda p: jnp.asarray(
      rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-30, 30, p.shape),
      jnp.float32,
    ),
    params,
  )
  today, with_b1 = madam_optax.madam(), madam_optax.madam(b1=0.95)
  _assert_same(
    jax.jit(with_b1.update)(grads, with_b1.init(params), params)[0],
    jax.jit(today.update)(grads, today.init(params), params)[0],
    "first step",
  )


def test_a_nan_gradient_keeps_both_moments():
  params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}
  tx = madam_optax.madam(b1=0.9)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([1.0, -1.0, 2.0, 1.0])}, state, params)
  for update in (tx.update, jax.jit(tx.update)):
    g = {"w": jnp.array([np.nan, np.inf, -np.inf, 2.0])}
    u, new_state = update(g, state, params)
    new = optax.apply_updates(params, u)["w"]
    assert np.all(np.isnan(new[:3])) and np.isfinite(new[3])
    for buffer in ("mu", "rms_hat"):
      old_b = getattr(state[0], buffer)["w"]
      new_b = getattr(new_state[0], buffer)["w"]
      np.testing.assert_array_equal(new_b[:3], old_b[:3])
      assert new_b[3] != old_b[3]


STEPS = 50
SHAPES = {"scalar": (), "vector": (7,), "matrix": (16, 9), "with_zeros": (5, 4)}
ORACLE_SETTINGS = {
  "defaults": {"b1": 0.9},
  "schedule": {
    "b1": 0.8,
    "b2": 0.99,
    "g_bound": 2.0,
    "learning_rate": optax.cosine_decay_schedule(0.1, STEPS),
  },
  "fixed_bound": {"b1": 0.5, "max_magnitude": 1.5, "p_scale": 1.0},
}


def _oracle_problem(seed):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  params["with_zeros"][rng.random(SHAPES["with_zeros"]) < 0.3] = 0.0
  # A drift in sign per tensor, so that the first moment matters.
  drift = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  grads = []
  for t in range(STEPS):
    g = {}
    for k, s in SHAPES.items():
      x = (drift[k] + rng.standard_normal(s)) * rng.choice(
        [1.0, 0.0, 1e-20, 1e6], size=s, p=[0.7, 0.1, 0.1, 0.1]
      )
      g[k] = np.zeros(s) if t % 17 == 3 else x
    grads.append(g)
  return params, grads


def _worst_relative_error(kwargs, dtype, seed):
  params, grads = _oracle_problem(seed)
  params = {k: v.astype(dtype) for k, v in params.items()}
  grads = [{k: v.astype(dtype) for k, v in g.items()} for g in grads]
  ref_kwargs = dict(kwargs)
  if "learning_rate" in ref_kwargs:
    ref_kwargs["lr"] = ref_kwargs.pop("learning_rate")
  reference = madam_reference(params, grads, **ref_kwargs)
  without = madam_reference(params, grads, **{**ref_kwargs, "b1": 0.0})
  tx = madam_optax.madam(**kwargs)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  worst, moved = 0.0, 0.0
  for t in range(STEPS):
    p, state = step(p, state, jax.tree.map(jnp.asarray, grads[t]))
    for k, ref in reference[t].items():
      assert p[k].dtype == dtype
      ours = np.asarray(p[k], np.float64)
      np.testing.assert_array_equal(ours[ref == 0], 0.0)
      nz = ref != 0
      if nz.any():
        rel = np.abs(ours[nz] - ref[nz]) / np.abs(ref[nz])
        worst = max(worst, float(np.max(rel)))
        gap = np.abs(without[t][k][nz] - ref[nz]) / np.abs(ref[nz])
        moved = max(moved, float(np.max(gap)))
  # The oracle with b1 is far from the one without: the test can fail.
  assert moved > 1e-3
  return worst


@pytest.mark.parametrize(
  "kwargs", ORACLE_SETTINGS.values(), ids=list(ORACLE_SETTINGS)
)
def test_float64_follows_the_float64_oracle(kwargs):
  with jax.enable_x64(True):
    worst = _worst_relative_error(kwargs, np.float64, seed=0)
  assert worst <= 1e-10, f"worst relative error {worst:.3g}"


@pytest.mark.parametrize(
  "kwargs", ORACLE_SETTINGS.values(), ids=list(ORACLE_SETTINGS)
)
def test_float32_follows_the_float64_oracle(kwargs):
  worst = _worst_relative_error(kwargs, np.float32, seed=1)
  assert worst <= 4e-6, f"worst relative error {worst:.3g}"


def test_lns_madam_with_b1_follows_the_integer_rule_oracle():
  """Nearest rounding on int16 codes: SPEC §2's rule fed m_hat / sqrt(v_hat)."""
  fmt = madam_optax.REFERENCE_FORMAT
  rng = np.random.default_rng(11)
  codes0 = rng.integers(1, 4096, size=(6, 5)) * rng.choice([-1, 1], (6, 5))
  drift = rng.standard_normal((6, 5))
  grads = [
    (drift + rng.standard_normal((6, 5))).astype(np.float32) for _ in range(30)
  ]
  want = integer_rule_reference(
    codes0, grads, levels=4096, levels_per_unit=10.0, b2=0.99, b1=0.9
  )
  without = integer_rule_reference(
    codes0, grads, levels=4096, levels_per_unit=10.0, b2=0.99
  )
  assert not np.array_equal(want[-1], without[-1])
  tx = madam_optax.lns_madam(
    fmt, learning_rate=0.01, rounding="nearest", b2=0.99, b1=0.9
  )
  codes = {"c": jnp.asarray(codes0, jnp.int16)}
  state = tx.init(codes)
  step = jax.jit(tx.update)
  mismatches = 0
  for t, g in enumerate(grads):
    u, state = step({"c": jnp.asarray(g)}, state, codes)
    codes = optax.apply_updates(codes, u)
    assert codes["c"].dtype == jnp.int16
    # Float32 against float64 may round a step at exactly half a level the
    # other way: allow one level on a few entries, never more.
    diff = np.abs(np.asarray(codes["c"], np.int64) - want[t])
    assert diff.max() <= 1, f"step {t + 1}"
    mismatches = max(mismatches, int((diff > 0).sum()))
  assert mismatches <= 1


# ----------------------------------------------------- inject_hyperparams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_injected_b1_equals_the_plain_call(dtype):
  """b1 injected (an array: the buffer is always there) gives the plain
  call's numbers bit for bit; changed between steps, it takes effect."""
  with jax.enable_x64(dtype == "float64"):
    hyper_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    params = _tree(np.random.default_rng(12), jnp.dtype(dtype))
    injected = optax.inject_hyperparams(
      madam_optax.madam, hyperparam_dtype=hyper_dtype
    )(learning_rate=0.03, b1=0.9, b2=0.99)
    plain = madam_optax.madam(learning_rate=0.03, b1=0.9, b2=0.99)
    s_i, s_p = injected.init(params), plain.init(params)
    assert s_i.hyperparams["b1"].dtype == hyper_dtype
    rng = np.random.default_rng(13)
    for t in range(3):
      grads = _gradients(rng, params)
      u_i, s_i = jax.jit(injected.update)(grads, s_i, params)
      u_p, s_p = jax.jit(plain.update)(grads, s_p, params)
      _assert_same(u_i, u_p, f"updates at step {t + 1}")
      _assert_same(s_i.inner_state, s_p, f"state at step {t + 1}")
      params = optax.apply_updates(params, u_p)
    grads = _gradients(rng, params)
    changed = s_i._replace(
      hyperparams={**s_i.hyperparams, "b1": jnp.asarray(0.0, hyper_dtype)}
    )
    u_0, _ = jax.jit(injected.update)(grads, changed, params)
    u_9, _ = jax.jit(injected.update)(grads, s_i, params)
    assert not all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(u_0), jax.tree.leaves(u_9))
    )


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "b1, match",
  [
    (-0.1, "b1 must be >= 0"),
    (1.0, "b1 must be < 1"),
    (float("nan"), "b1 must be finite"),
    (1 - 1e-9, "b1=.* rounds to 1.0 in float32"),
    (jnp.asarray(0.9, jnp.bfloat16), "b1 arrived as a bfloat16 array"),
  ],
)
def test_invalid_b1_is_refused(b1, match):
  for make in (
    madam_optax.madam,
    madam_optax.scale_by_moments,
    lambda b1: madam_optax.lns_madam(madam_optax.REFERENCE_FORMAT, b1=b1),
  ):
    with pytest.raises(ValueError, match=match):
      make(b1=b1)


def test_factored_with_b1_is_refused():
  with pytest.raises(ValueError, match="factored=True keeps no first moment"):
    madam_optax.madam(factored=True, b1=0.9)
  with pytest.raises(ValueError, match="factored=True keeps no first moment"):
    madam_optax.lns_madam(madam_optax.REFERENCE_FORMAT, factored=True, b1=0.9)
  madam_optax.madam(factored=True, b1=0.0)  # the paper's Madam: accepted


def test_mu_dtype_needs_b1_and_the_parameters_range():
  with pytest.raises(ValueError, match="keeps no first moment"):
    madam_optax.madam(mu_dtype=jnp.bfloat16)
  tx = madam_optax.madam(b1=0.9, mu_dtype=jnp.float16)
  with pytest.raises(
    ValueError, match=r"mu_dtype float16 cannot hold the first"
  ):
    tx.init({"w": jnp.ones(3)})
  state = madam_optax.madam(b1=0.9, mu_dtype=jnp.bfloat16).init(
    {"w": jnp.ones(3)}
  )
  assert state[0].mu["w"].dtype == jnp.bfloat16
  assert state[0].rms_hat["w"].dtype == jnp.float32
