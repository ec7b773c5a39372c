"""``madam()`` runs in one pass per tensor: it must be the chain of its parts.

The fused transform is held to ``optax.chain(scale_by_second_moment,
optax.clip, multiplicative_step, clip_weight_magnitude)`` leaf for leaf: the
same state structure, and at every step the same updates and second moments,
bit for bit (a zero may differ in sign: for a zero weight the chain forms
``0 * expm1(0)`` and the fused step ``0 * expm1(x)``), on many trees, dtypes
and settings, including the ones that take the chain's general path. Then the
maths itself: the first step is exactly a sign step, the magnitude bound holds
exactly, and float64 parameters follow an independent float64 NumPy oracle
(``tests/reference.py``) to 1e-10 over 200 steps, float32 ones to 4e-6.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import madam_reference

import madam_optax


def chain_of_parts(
  learning_rate=0.01,
  *,
  p_scale=3.0,
  g_bound=10.0,
  b2=0.999,
  state_dtype=None,
  max_magnitude=None,
):
  """Madam as the chain of its public parts (what ``madam()`` must equal)."""
  return optax.chain(
    madam_optax.scale_by_second_moment(b2, state_dtype=state_dtype),
    optax.clip(g_bound),
    madam_optax.multiplicative_step(learning_rate),
    madam_optax.clip_weight_magnitude(p_scale, max_magnitude=max_magnitude),
  )


def _decades(dtype, most):
  """Up to ``most`` decades each way, within ``dtype``'s finite range."""
  return min(most, int(np.log10(float(jnp.finfo(dtype).max))) - 2)


def _tree(rng, dtype):
  """A model-like tree: kernels, a conv, a bias, a scalar, zeros inside."""
  span = _decades(dtype, 15)
  tree = {
    "dense": {
      "kernel": rng.standard_normal((33, 17)),
      "bias": rng.standard_normal(17) * 1e-3,
    },
    "conv": rng.standard_normal((3, 3, 4, 5)) * 0.1,
    "scale": np.asarray(1.7),
    "with_zeros": rng.standard_normal((6, 5)),
    "huge_and_tiny": rng.standard_normal(8)
    * 10.0 ** rng.uniform(-span, span, 8),
  }
  tree["with_zeros"][rng.random((6, 5)) < 0.3] = 0.0
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _gradients(rng, params):
  """Gradients mixing ordinary, zero, tiny (1e-20) and huge (1e6) values
  (float16: 1e3, its range)."""

  def one(p):
    huge = 10.0 ** _decades(p.dtype, 6)
    g = rng.standard_normal(p.shape) * rng.choice(
      [1.0, 0.0, 1e-20, huge], size=p.shape, p=[0.7, 0.1, 0.1, 0.1]
    )
    return jnp.asarray(g, p.dtype)

  return jax.tree.map(one, params)


def _assert_same(fused, chained, what):
  """Same leaves: equal bits where nonzero, equal values (zeros) elsewhere."""
  f_leaves, f_def = jax.tree.flatten(fused)
  c_leaves, c_def = jax.tree.flatten(chained)
  assert f_def == c_def, what
  for a, b in zip(f_leaves, c_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, what
    np.testing.assert_array_equal(a, b, err_msg=what)
    if a.dtype.kind == "f":
      nonzero = a != 0
      width = f"u{a.dtype.itemsize}"
      np.testing.assert_array_equal(
        a[nonzero].view(width), b[nonzero].view(width), err_msg=what
      )


def _run_against_chain(params, kwargs, steps=8, seed=0):
  fused, chained = madam_optax.madam(**kwargs), chain_of_parts(**kwargs)
  state = fused.init(params)
  _assert_same(state, chained.init(params), "init")
  fused_step = jax.jit(fused.update)
  chained_step = jax.jit(chained.update)
  rng = np.random.default_rng(seed)
  for t in range(steps):
    grads = _gradients(rng, params)
    u_f, s_f = fused_step(grads, state, params)
    u_c, s_c = chained_step(grads, state, params)
    _assert_same(u_f, u_c, f"updates at step {t + 1}")
    _assert_same(s_f, s_c, f"state at step {t + 1}")
    params, state = optax.apply_updates(params, u_f), s_f
  return params


SETTINGS = {
  "defaults": {},
  "short_step": {"learning_rate": 0.1, "g_bound": 2.0, "b2": 0.9},
  "long_step": {"learning_rate": 0.5},  # the chain's general path
  "schedule": {"learning_rate": optax.exponential_decay(0.05, 5, 0.5)},
  "fixed_bound": {"max_magnitude": 0.3},  # weights start far above
  "p_scale_1": {"p_scale": 1.0, "b2": 0.99},
  "bf16_state": {"state_dtype": jnp.bfloat16},
  "array_hyperparameters": {
    "learning_rate": jnp.asarray(0.02),
    "g_bound": jnp.asarray(5.0),
  },
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fused_equals_chain_leaf_for_leaf(setting, dtype):
  params = _tree(np.random.default_rng(1), dtype)
  _run_against_chain(params, SETTINGS[setting])


@pytest.mark.parametrize("setting", ["defaults", "long_step", "fixed_bound"])
def test_fused_equals_chain_in_float64(setting):
  with jax.enable_x64(True):
    params = _tree(np.random.default_rng(2), jnp.float64)
    _run_against_chain(params, SETTINGS[setting])


def test_fused_equals_chain_on_mixed_dtypes():
  rng = np.random.default_rng(3)
  params = {
    "f32": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32),
    "bf16": jnp.asarray(rng.standard_normal(9), jnp.bfloat16),
    "f16": jnp.asarray(rng.standard_normal((2, 2)), jnp.float16),
  }
  _run_against_chain(params, {})


def test_fused_equals_chain_under_masked_and_inject_hyperparams():
  params = _tree(np.random.default_rng(4), jnp.float32)
  mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  for make in (
    lambda f: optax.masked(f(), mask),
    lambda f: optax.inject_hyperparams(f)(learning_rate=0.03),
  ):
    fused = make(madam_optax.madam)
    chained = make(chain_of_parts)
    state = fused.init(params)
    grads = _gradients(np.random.default_rng(5), params)
    for _ in range(3):
      u_f, s_f = jax.jit(fused.update)(grads, state, params)
      u_c, s_c = jax.jit(chained.update)(grads, state, params)
      _assert_same(u_f, u_c, "updates")
      _assert_same(s_f, s_c, "state")
      params, state = optax.apply_updates(params, u_f), s_f


def test_first_step_is_exactly_a_sign_step():
  """Step 1 equals the multiplicative step applied to sign(g), bit for bit,
  for gradients from 1e-30 to 1e30 and zeros. Both are compiled, as in
  training: XLA:CPU contracts ``w + w * expm1(x)`` into one fused
  multiply-add, which op-by-op (eager) execution rounds twice."""
  rng = np.random.default_rng(6)
  params = _tree(rng, jnp.float32)
  grads = jax.tree.map(
    lambda p: jnp.asarray(
      rng.standard_normal(p.shape)
      * 10.0 ** rng.uniform(-30, 30, p.shape)
      * (rng.random(p.shape) < 0.9),
      jnp.float32,
    ),
    params,
  )
  tx = madam_optax.madam()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  sign_step = optax.chain(
    madam_optax.multiplicative_step(0.01),
    madam_optax.clip_weight_magnitude(3.0),
  )
  expected, _ = jax.jit(sign_step.update)(
    jax.tree.map(jnp.sign, grads), sign_step.init(params), params
  )
  _assert_same(updates, expected, "first step")
  # And each weight moved by exactly the factor e**(-0.01 sign(g w)), or not
  # at all where g = 0 (before the bound, which these weights are within).
  new = optax.apply_updates(params, updates)
  for p, g, n in zip(*map(jax.tree.leaves, (params, grads, new))):
    p, g, n = (np.asarray(x, np.float64) for x in (p, g, n))
    factor = np.exp(-0.01 * np.sign(g) * np.sign(p))
    inside = np.abs(p * factor) < 0.9 * np.asarray(
      madam_optax.initial_max_magnitude(jnp.asarray(p, jnp.float32))
    )
    np.testing.assert_allclose(n[inside], (p * factor)[inside], rtol=1.2e-7)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  log_w=st.lists(st.floats(-30, 30), min_size=1, max_size=12),
  log_bound=st.floats(-30, 30),
  lr=st.sampled_from([0.01, 0.3, 2.0]),
  seed=st.integers(0, 2**16),
)
def test_bound_holds_exactly(log_w, log_bound, lr, seed):
  """|w| <= bound after every step, exactly, even from weights far outside.

  Signs are kept too, except from weights more than 2**24 times the bound:
  there ``w + (bound - w)`` rounds to 0 in float32 (the update is additive).
  """
  rng = np.random.default_rng(seed)
  w = np.asarray(
    rng.choice([-1.0, 1.0], len(log_w)) * 10.0 ** np.asarray(log_w), np.float32
  )
  bound = np.float32(10.0**log_bound)
  tx = madam_optax.madam(learning_rate=lr, max_magnitude=float(bound))
  params = {"w": jnp.asarray(w)}
  state = tx.init(params)
  step = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)
    )
  )
  for _ in range(3):
    grads = {"w": jnp.asarray(rng.standard_normal(len(log_w)), jnp.float32)}
    params, state = step(params, state, grads)
    assert np.all(np.abs(np.asarray(params["w"])) <= bound)
  representable = np.abs(w) < 2.0**23 * bound
  np.testing.assert_array_equal(
    np.sign(np.asarray(params["w"]))[representable], np.sign(w)[representable]
  )


# ------------------------------------------------- against the float64 oracle

STEPS = 200
SHAPES = {
  "scalar": (),
  "vector": (7,),
  "matrix": (16, 9),
  "conv": (3, 3, 4, 5),
  "with_zeros": (5, 4),
}
ORACLE_SETTINGS = [
  {},
  {"learning_rate": 0.1, "p_scale": 1.0, "g_bound": 2.0, "b2": 0.9},
  {"max_magnitude": 1.5, "b2": 0.99},
]


def _oracle_problem(seed):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  params["with_zeros"][rng.random(SHAPES["with_zeros"]) < 0.3] = 0.0
  grads = []
  for t in range(STEPS):
    g = {}
    for k, s in SHAPES.items():
      x = rng.standard_normal(s) * rng.choice(
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
  tx = madam_optax.madam(**kwargs)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  step = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)
    )
  )
  worst = 0.0
  for t in range(STEPS):
    p, state = step(p, state, jax.tree.map(jnp.asarray, grads[t]))
    for k, ref in reference[t].items():
      assert p[k].dtype == dtype
      ours = np.asarray(p[k], np.float64)
      np.testing.assert_array_equal(ours[ref == 0], 0.0)
      nz = ref != 0
      if nz.any():
        worst = max(
          worst, float(np.max(np.abs(ours[nz] - ref[nz]) / np.abs(ref[nz])))
        )
  return worst


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
  "kwargs", ORACLE_SETTINGS, ids=["defaults", "aggressive", "fixed-bound"]
)
def test_float64_follows_the_float64_oracle(kwargs, seed):
  """Float64 parameters compute in float64 throughout (the bias correction
  included): measured ~4e-15 worst relative error over 200 steps; float32
  bias corrections gave ~5e-7."""
  with jax.enable_x64(True):
    worst = _worst_relative_error(kwargs, np.float64, seed)
  assert worst <= 1e-10, f"worst relative error {worst:.3g}"


@pytest.mark.parametrize(
  "kwargs", ORACLE_SETTINGS, ids=["defaults", "aggressive", "fixed-bound"]
)
def test_float32_follows_the_float64_oracle(kwargs):
  """The float32 bound of the core oracle test: 4e-6 over 200 steps."""
  worst = _worst_relative_error(kwargs, np.float32, seed=2)
  assert worst <= 4e-6, f"worst relative error {worst:.3g}"
