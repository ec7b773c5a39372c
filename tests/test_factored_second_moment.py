"""The factored second moment: maths, robustness, the Optax contract, sharding.

``scale_by_factored_second_moment`` is checked against an independent float64
NumPy computation of its documented maths (Adafactor's row/column means,
Madam's bias correction, no epsilon, 0/0 := 0) over many steps, and
``madam(factored=True)`` / ``lns_madam(fmt, factored=True)`` are held to the
contract the other transforms meet: ``inject_hyperparams``, schedules,
``MultiSteps``, ``MaskedNode`` and ``None`` leaves, dtypes, extra keyword
arguments, no recompilation, Orbax round-trips, convergence, and sharding on
the 8 simulated CPU devices of ``conftest.py`` (each statistic sharded with
its dimension; the update's collectives listed exactly).
"""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import collectives_in
from meshes import make_mesh
from meshes import partitioned_mlp
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax._src.factored_second_moment import factored_axes

MIN_DIM = 8
INT8 = madam_optax.LNSFormat.spanning(127)
F32_EPS = float(np.finfo(np.float32).eps)

# Factored with MIN_DIM = 8: "mat" (0, 1), "conv" (2, 3), "cube" (1, 2),
# "tall" (0, 1); full: "vec", "thin" (second largest 3 < 8), "scalar".
SHAPES = {
  "mat": (12, 20),
  "conv": (3, 3, 8, 16),
  "cube": (4, 10, 12),
  "tall": (40, 9),
  "vec": (20,),
  "thin": (3, 40),
  "scalar": (),
}


# ------------------------------------------------- the float64 reference


def reference_axes(shape, min_dim):
  """The two largest axes (ties: the later one is larger), if both >= min_dim."""
  if len(shape) < 2:
    return None
  order = np.argsort(np.asarray(shape), kind="stable")
  a, b = sorted(int(i) for i in order[-2:])
  return (a, b) if min(shape[a], shape[b]) >= min_dim else None


class Reference:
  """The documented maths in float64 NumPy, one leaf at a time."""

  def __init__(self, shape, b2, min_dim=MIN_DIM):
    self.b2, self.t = b2, 0
    self.axes = reference_axes(shape, min_dim)
    if self.axes is None:
      self.v = np.zeros(shape)
    else:
      row_axis, col_axis = self.axes
      self.r = np.zeros(tuple(np.delete(shape, col_axis)))
      self.c = np.zeros(tuple(np.delete(shape, row_axis)))

  def update(self, g):
    g = np.asarray(g, np.float64)
    b2, self.t = self.b2, self.t + 1
    if self.axes is None:
      self.v = b2 * self.v + (1 - b2) * g**2
      v_hat = self.v / (1 - b2**self.t)
    else:
      row_axis, col_axis = self.axes
      self.r = b2 * self.r + (1 - b2) * np.mean(g**2, axis=col_axis)
      self.c = b2 * self.c + (1 - b2) * np.mean(g**2, axis=row_axis)
      mean_r = np.mean(self.r, axis=row_axis, keepdims=True)
      v_hat = (
        np.expand_dims(self.r / mean_r, col_axis)
        * np.expand_dims(self.c, row_axis)
      ) / (1 - b2**self.t)
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(g == 0, 0.0, g / np.sqrt(v_hat))


def gradient_stream(shapes, steps, scale, seed=0):
  """Gaussian gradients with zeros: random entries, a row that is always
  zero, and whole-tensor zero steps."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    grads = {}
    for name, shape in shapes.items():
      g = np.array(rng.standard_normal(shape) * scale)
      g[rng.random(shape) < 0.2] = 0.0
      if len(shape) >= 2:
        g[..., 0, :] = 0.0  # a row that never gets a gradient
      if t == 3:
        g[...] = 0.0  # a step with no gradient at all
      grads[name] = g
    out.append(grads)
  return out


def run_transform(tx, grads_seq, dtype=jnp.float32):
  params = {k: jnp.zeros(np.shape(v), dtype) for k, v in grads_seq[0].items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs = []
  for grads in grads_seq:
    u, state = step(jax.tree.map(lambda g: jnp.asarray(g, dtype), grads), state)
    outs.append(jax.device_get(u))
  return outs, state


def assert_matches_reference(outs, grads_seq, b2, rtol):
  refs = {name: Reference(np.shape(g), b2) for name, g in grads_seq[0].items()}
  for t, (u, grads) in enumerate(zip(outs, grads_seq)):
    for name, g in grads.items():
      expected = refs[name].update(g)
      got = np.asarray(u[name], np.float64)
      assert np.all(np.isfinite(got)), (t, name)
      np.testing.assert_array_equal(
        got == 0, expected == 0, err_msg=f"step {t + 1} {name}"
      )
      np.testing.assert_allclose(
        got, expected, rtol=rtol, atol=0, err_msg=f"step {t + 1} {name}"
      )


# ------------------------------------------------------------------ maths


def test_factored_axes_follow_adafactor():
  assert factored_axes((768, 3072)) == (0, 1)
  assert factored_axes((3072, 768)) == (0, 1)
  assert factored_axes((3, 3, 256, 512)) == (2, 3)
  assert factored_axes((512, 3, 256)) == (0, 2)
  assert factored_axes((128, 128, 128)) == (1, 2)  # ties: the later axes
  assert factored_axes((127, 4096)) is None
  assert factored_axes((4096,)) is None and factored_axes(()) is None
  assert factored_axes((3, 40), 3) == (0, 1)
  for shape in [(3, 3, 8, 16), (40, 9), (4, 10, 12), (8, 8, 8), (9, 2, 9)]:
    assert factored_axes(shape, 1) == reference_axes(shape, 1), shape
  # optax.scale_by_factored_rms factors the same tensors over the same axes
  # (it names its statistics after the larger axis, this module after the
  # tensor's order, so the pair of shapes is compared).
  state = optax.scale_by_factored_rms(min_dim_size_to_factor=MIN_DIM).init(
    {k: jnp.zeros(s) for k, s in SHAPES.items()}
  )
  ours = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  ).init({k: jnp.zeros(s) for k, s in SHAPES.items()})
  for name, shape in SHAPES.items():
    if factored_axes(shape, MIN_DIM) is not None:
      assert ours.rms_hat[name].shape == ()
      assert sorted(
        [ours.row_rms_hat[name].shape, ours.col_rms_hat[name].shape]
      ) == (sorted([state.v_row[name].shape, state.v_col[name].shape])), name
    else:
      assert state.v[name].shape == shape, name


@pytest.mark.parametrize("b2", [0.9, 0.999])
@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e6])
def test_matches_float64_reference_over_many_steps(scale, b2):
  grads_seq = gradient_stream(SHAPES, steps=40, scale=scale)
  tx = madam_optax.scale_by_factored_second_moment(
    b2, min_dim_size_to_factor=MIN_DIM
  )
  outs, state = run_transform(tx, grads_seq)
  assert_matches_reference(outs, grads_seq, b2, rtol=2e-5)
  assert int(state.count) == 40
  # The factorisation is real: factored updates are not sign(g).
  last = grads_seq[-1]["mat"]
  assert not np.allclose(np.abs(outs[-1]["mat"])[last != 0], 1.0, rtol=0.1)


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e30])
def test_extreme_float32_gradients_neither_underflow_nor_overflow(scale):
  """Squares of 1e-20 underflow and of 1e30 overflow in float32: the
  statistics are kept as roots and each mean square is taken at a scale of
  its own, so the float32 updates still match the float64 maths."""
  grads_seq = gradient_stream(SHAPES, steps=12, scale=scale, seed=3)
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  outs, state = run_transform(tx, grads_seq)
  assert_matches_reference(outs, grads_seq, 0.999, rtol=2e-5)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_rows_and_columns_of_very_different_scales_in_one_matrix():
  """Rows of 1e-20 beside rows of 1e30 (and the same for columns): the
  update is formed from mantissas and exponents, so no product of the
  statistics over- or underflows although their ratios span 1e50."""
  rng = np.random.default_rng(5)
  grads_seq = []
  for _ in range(6):
    g = rng.standard_normal((16, 24))
    g[:5] *= 1e-20
    g[5:9] *= 1e30
    g[:, :3] *= 1e-10
    grads_seq.append({"mat": g})
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  outs, _ = run_transform(tx, grads_seq)
  assert_matches_reference(outs, grads_seq, 0.999, rtol=2e-5)


def test_first_step():
  """t = 1: sign(g) bit for bit on unfactored tensors; on factored ones,
  sign(g) when |g| is rank one (|g_ij| = a_i b_j), to 4 ulps."""
  rng = np.random.default_rng(2)
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  first = jax.jit(lambda g: tx.update(g, tx.init(g))[0])
  for trial in range(20):
    a = np.exp(3 * rng.standard_normal(12))
    b = np.exp(3 * rng.standard_normal(20))
    signs = rng.choice([-1.0, 1.0], (12, 20))
    grads = {
      "mat": jnp.asarray(np.outer(a, b) * signs, jnp.float32),
      "vec": jnp.asarray(rng.standard_normal(20) * 10.0**trial, jnp.float32),
    }
    u = first(grads)
    np.testing.assert_array_equal(u["vec"], jnp.sign(grads["vec"]))
    np.testing.assert_array_equal(jnp.sign(u["mat"]), signs)
    ulps = np.abs(np.abs(np.asarray(u["mat"], np.float64)) - 1.0) / F32_EPS
    assert ulps.max() <= 4.0, ulps.max()
  # |g| constant: every mean is exact, so is sign(g).
  g = {"mat": jnp.asarray(rng.choice([-0.25, 0.25], (12, 20)), jnp.float32)}
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(u["mat"], jnp.sign(g["mat"]))
  # Not rank one: the first step is the rank-one fit, not sign(g).
  g = {"mat": jnp.asarray(rng.standard_normal((12, 20)), jnp.float32)}
  u, _ = tx.update(g, tx.init(g))
  expected = Reference((12, 20), 0.999).update(g["mat"])
  np.testing.assert_allclose(u["mat"], expected, rtol=1e-5)
  assert np.abs(np.abs(expected) - 1).max() > 0.5


def test_zero_gradients_give_zero_updates_and_no_nan():
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  params = {"mat": jnp.zeros((12, 20)), "vec": jnp.zeros(20)}
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(params, state)
    chex.assert_trees_all_equal(u, params)
  chex.assert_trees_all_equal(
    (state.row_rms_hat["mat"], state.col_rms_hat["mat"], state.rms_hat["vec"]),
    (jnp.zeros(12), jnp.zeros(20), jnp.zeros(20)),
  )
  # One nonzero entry: only it moves; the rest of its row and column stay 0.
  g = {"mat": jnp.zeros((12, 20)).at[4, 7].set(-3.0), "vec": jnp.zeros(20)}
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(
    u["mat"], jnp.zeros((12, 20)).at[4, 7].set(u["mat"][4, 7])
  )
  # After three zero steps the bias correction (1 - b2**4) is applied to one
  # gradient's average: sqrt((1 - b2**4) / (1 - b2)) = 1.9985... (as Adam;
  # b2 = 0.999 rounded to float32 moves it by 6e-6).
  np.testing.assert_allclose(
    u["mat"][4, 7], -np.sqrt((1 - 0.999**4) / (1 - 0.999)), rtol=1e-5
  )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_a_non_finite_gradient_gives_nan_there_and_keeps_the_statistics(
  bad, jit
):
  """A NaN or inf entry: a NaN update there (for apply_if_finite to see);
  the statistics of its row and column as they were (a NaN there would
  reach every later step), every other row and column as if the entry were
  zero; the updates elsewhere finite."""
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  update = jax.jit(tx.update) if jit else tx.update
  grads_seq = gradient_stream({"mat": (12, 20), "vec": (20,)}, 4, 1.0)
  grads_seq = [jax.tree.map(jnp.asarray, g) for g in grads_seq]
  state = tx.init(grads_seq[0])
  _, state = update(grads_seq[0], state)
  bad_g = {
    "mat": grads_seq[1]["mat"].at[5, 6].set(bad),
    "vec": grads_seq[1]["vec"].at[2].set(bad),
  }
  u, bad_state = update(bad_g, state)
  assert np.isnan(u["mat"][5, 6]) and np.isnan(u["vec"][2])
  finite = np.ones((12, 20), bool)
  finite[5, 6] = False
  assert np.all(np.isfinite(np.asarray(u["mat"])[finite]))
  assert np.all(np.isfinite(np.delete(np.asarray(u["vec"]), 2)))
  zeroed = {
    "mat": bad_g["mat"].at[5, 6].set(0.0),
    "vec": bad_g["vec"].at[2].set(0.0),
  }
  _, zeroed_state = update(zeroed, state)
  for stat, kept in (("row_rms_hat", 5), ("col_rms_hat", 6)):
    got = np.asarray(getattr(bad_state, stat)["mat"])
    assert got[kept] == getattr(state, stat)["mat"][kept], stat
    np.testing.assert_array_equal(
      np.delete(got, kept),
      np.delete(np.asarray(getattr(zeroed_state, stat)["mat"]), kept),
    )
  assert bad_state.rms_hat["vec"][2] == state.rms_hat["vec"][2]
  chex.assert_tree_all_finite((bad_state.row_rms_hat, bad_state.col_rms_hat))
  chex.assert_tree_all_finite(bad_state.rms_hat)
  u2, _ = update(grads_seq[2], bad_state)
  chex.assert_tree_all_finite(u2)


def test_python_scalar_leaves():
  tx = madam_optax.scale_by_factored_second_moment(min_dim_size_to_factor=2)
  params = {"w": jnp.ones((3, 4)), "s": 1.0}
  state = tx.init(params)
  assert state.rms_hat["s"].dtype == jnp.float32
  u, _ = tx.update({"w": jnp.ones((3, 4)), "s": -2.0}, state)
  np.testing.assert_array_equal(u["w"], jnp.ones((3, 4)))
  assert u["s"] == -1.0


def test_state_is_one_statistic_per_row_and_column():
  params = {"w": jnp.zeros((300, 200)), "b": jnp.zeros(200)}
  state = madam_optax.scale_by_factored_second_moment().init(params)
  assert state.row_rms_hat["w"].shape == (300,)
  assert state.col_rms_hat["w"].shape == (200,)
  assert state.rms_hat["w"].shape == () and state.rms_hat["b"].shape == (200,)
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  # + the int32 count and three float32 zero placeholders.
  assert total == 4 * (300 + 200 + 200) + 4 + 3 * 4


# --------------------------------------------------------- Optax contract


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((12, 10)), dtype),
      "bias": jnp.asarray(rng.standard_normal(10), dtype),
    },
    "scale": jnp.asarray(1.5, dtype),
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
  )


def _run(tx, params, steps=5, **extra):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, _grads(params, i))
  return params, state


def factored_madam(**kw):
  return madam_optax.madam(factored=True, min_dim_size_to_factor=MIN_DIM, **kw)


def test_madam_factored_swaps_only_the_normaliser():
  params = _params()
  tx = factored_madam(learning_rate=0.03)
  parts = optax.chain(
    madam_optax.scale_by_factored_second_moment(min_dim_size_to_factor=MIN_DIM),
    optax.clip(10.0),
    madam_optax.multiplicative_step(0.03),
    madam_optax.clip_weight_magnitude(3.0),
  )
  chex.assert_trees_all_equal(_run(tx, params), _run(parts, params))
  # The default leaves madam unchanged; this tree's kernel is factored.
  _, state = _run(madam_optax.madam(), params)
  assert isinstance(state[0], madam_optax.ScaleBySecondMomentState)
  _, state = _run(tx, params)
  assert state[0].row_rms_hat["dense"]["kernel"].shape == (12,)


def test_inject_hyperparams_matches_plain_call():
  params = _params()
  hyper = {
    "learning_rate": 0.03,
    "p_scale": 2.0,
    "g_bound": 0.7,
    "b2": 0.9,
    "min_dim_size_to_factor": MIN_DIM,
  }
  plain = _run(madam_optax.madam(factored=True, **hyper), params)
  injected_tx = optax.inject_hyperparams(madam_optax.madam)(
    factored=True, **hyper
  )
  injected = _run(injected_tx, params)
  # Injected hyperparameters are float32 arrays: the same to rounding.
  chex.assert_trees_all_close(plain[0], injected[0], rtol=1e-6)
  assert "min_dim_size_to_factor" in injected[1].hyperparams
  # The transform on its own, b2 injected.
  tx = madam_optax.scale_by_factored_second_moment
  g = _grads(params, 0)
  plain_tx = tx(0.9, min_dim_size_to_factor=MIN_DIM)
  plain_u, _ = jax.jit(plain_tx.update)(g, plain_tx.init(params))
  inj = optax.inject_hyperparams(tx)(b2=0.9, min_dim_size_to_factor=MIN_DIM)
  inj_u, _ = jax.jit(inj.update)(g, inj.init(params))
  chex.assert_trees_all_equal(plain_u, inj_u)


def test_min_dim_must_be_known_at_init():
  params = _params()
  inj = optax.inject_hyperparams(madam_optax.scale_by_factored_second_moment)(
    min_dim_size_to_factor=MIN_DIM
  )
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(inj.init)(params)
  static = optax.inject_hyperparams(
    madam_optax.scale_by_factored_second_moment,
    static_args=("min_dim_size_to_factor",),
  )(min_dim_size_to_factor=MIN_DIM)
  state = jax.jit(static.init)(params)
  assert state.inner_state.row_rms_hat["dense"]["kernel"].shape == (12,)


def test_schedule_and_multisteps():
  params = _params()
  schedule = optax.linear_schedule(0.05, 0.005, 5)
  scheduled = _run(factored_madam(learning_rate=schedule), params)
  constant = _run(factored_madam(learning_rate=0.05), params)
  assert not np.allclose(scheduled[0]["scale"], constant[0]["scale"])
  every_k = optax.MultiSteps(factored_madam(), every_k_schedule=2)
  state = every_k.init(params)
  g0, g1 = _grads(params, 0), _grads(params, 1)
  accumulate = jax.jit(every_k.update)
  u0, state = accumulate(g0, state, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, params))
  u1, state = accumulate(g1, state, params)
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  plain = factored_madam()
  expected, _ = jax.jit(plain.update)(mean_grad, plain.init(params), params)
  # MultiSteps averages in another order; the weights agree to rounding.
  chex.assert_trees_all_close(
    optax.apply_updates(params, u1),
    optax.apply_updates(params, expected),
    rtol=1e-6,
  )


def test_masked_node_and_none_leaves():
  params = {"a": jnp.ones((9, 8)), "b": jnp.array([3.0]), "c": None}
  mask = {"a": True, "b": False, "c": None}
  tx = optax.masked(factored_madam(), mask)
  state = tx.init(params)
  grads = {"a": jnp.ones((9, 8)), "b": jnp.array([1.0]), "c": None}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["c"] is None
  np.testing.assert_array_equal(updates["b"], grads["b"])
  np.testing.assert_allclose(updates["a"], jnp.expm1(-0.01), rtol=1e-6)
  leaves = jax.tree.leaves(
    state, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )
  assert any(isinstance(x, optax.MaskedNode) for x in leaves)


def test_unexpected_keyword_arguments_and_no_recompilation():
  params = _params()
  tx = factored_madam()
  state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(
      grads, state, params, loss=jnp.array(1.0), unexpected="ignored"
    )
    return optax.apply_updates(params, updates), state

  for i in range(3):
    params, state = step(params, state, _grads(params, i))
  chex.assert_tree_all_finite(params)


@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64]
)
def test_dtypes_preserved_and_stable_in_cond(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    tx = factored_madam()
    params = _params(dtype)
    state = tx.init(params)
    assert state[0].row_rms_hat["dense"]["kernel"].dtype == dtype

    @jax.jit
    def step(params, state, grads, pred):
      def do(operands):
        params, state = operands
        updates, new_state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), new_state

      return jax.lax.cond(pred, do, lambda x: x, (params, state))

    for i, pred in enumerate([True, False, True]):
      new_params, new_state = step(params, state, _grads(params, i), pred)
      chex.assert_trees_all_equal_dtypes(new_params, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      params, state = new_params, new_state
    chex.assert_tree_all_finite(params)


def test_state_dtype_bfloat16():
  params = _params()
  tx = factored_madam(state_dtype=jnp.bfloat16)
  bf16, state = _run(tx, params)
  for leaf in jax.tree.leaves(
    (state[0].row_rms_hat, state[0].col_rms_hat, state[0].rms_hat)
  ):
    assert leaf.dtype == jnp.bfloat16
  fp32, _ = _run(factored_madam(), params)
  chex.assert_trees_all_close(fp32, bf16, rtol=2e-2)


def test_keyword_only_and_extra_args_type():
  import inspect  # pylint: disable=import-outside-toplevel

  for factory, first in (
    (madam_optax.scale_by_factored_second_moment, "b2"),
    (madam_optax.madam, "learning_rate"),
    (madam_optax.lns_madam, "learning_rate"),
  ):
    params = list(inspect.signature(factory).parameters.values())
    names = [p.name for p in params]
    assert {"factored", "min_dim_size_to_factor"} <= set(names) or (
      factory is madam_optax.scale_by_factored_second_moment
    )
    after = params[names.index(first) + 1 :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in after), names
  assert isinstance(
    madam_optax.scale_by_factored_second_moment(),
    optax.GradientTransformationExtraArgs,
  )
  assert "scale_by_factored_second_moment" in madam_optax.__all__
  assert "ScaleByFactoredSecondMomentState" in madam_optax.__all__


def test_errors():
  for bad in (0, -3, 2.5, True, "8"):
    with pytest.raises(ValueError, match="min_dim_size_to_factor"):
      madam_optax.scale_by_factored_second_moment(min_dim_size_to_factor=bad)
  with pytest.raises(ValueError, match="b2"):
    madam_optax.scale_by_factored_second_moment(b2=1.0)
  with pytest.raises(ValueError, match="state_dtype"):
    madam_optax.scale_by_factored_second_moment(state_dtype=jnp.int8)
  tx = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  )
  with pytest.raises(ValueError, match="floating-point"):
    tx.init({"w": jnp.zeros((9, 9), jnp.int8)})
  state = tx.init({"w": jnp.zeros((9, 9))})
  with pytest.raises(ValueError, match="do not match"):
    tx.update({"v": jnp.zeros((9, 9))}, state)
  with pytest.raises(ValueError, match=r"update shape \(9, 10\)"):
    tx.update({"w": jnp.zeros((9, 10))}, state)
  # A state initialised with another threshold is refused too.
  other = madam_optax.scale_by_factored_second_moment().init(
    {"w": jnp.zeros((9, 9))}
  )
  assert other.rms_hat["w"].shape == (9, 9)
  tx.update({"w": jnp.ones((9, 9))}, other)  # follows the state: full
  with pytest.raises(ValueError, match="rms_hat"):
    tx.update(
      {"w": jnp.zeros((9, 9))}, state._replace(row_rms_hat={"w": jnp.zeros(8)})
    )


# ----------------------------------------------------------- convergence


def test_madam_factored_converges():
  """A 32 x 24 linear least-squares problem from a start with the target's
  signs (a multiplicative update cannot cross zero), within the bound."""
  rng = np.random.default_rng(0)
  target = rng.choice([-1.0, 1.0], (32, 24)) * rng.uniform(0.2, 1.0, (32, 24))
  x = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
  y = x @ target
  params = {"w": jnp.asarray(np.sign(target) * 0.5, jnp.float32)}
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)
  tx = factored_madam(learning_rate=optax.cosine_decay_schedule(0.02, 600))
  state = tx.init(params)
  assert state[0].row_rms_hat["w"].shape == (32,)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  initial = float(loss(params))
  for _ in range(600):
    params, state = step(params, state)
  assert float(loss(params)) < 0.01 * initial


def test_lns_madam_factored_converges_on_int8_codes():
  rng = np.random.default_rng(1)
  target = rng.choice([-1.0, 1.0], (24, 16)) * rng.uniform(0.2, 1.0, (24, 16))
  x = jnp.asarray(rng.standard_normal((256, 24)), jnp.float32)
  y = x @ target
  params = {
    "w": jnp.asarray(np.sign(target) * 0.5, jnp.float32),
    "b": jnp.zeros(16),
  }
  codes, w_max = madam_optax.lns_encode_tree(params, INT8)
  inner = madam_optax.lns_madam(
    INT8, factored=True, min_dim_size_to_factor=MIN_DIM
  )
  tx = madam_optax.with_additive_fallback(codes, inner, optax.adam(1e-2))
  state = tx.init(codes)
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  value_and_grad = madam_optax.lns_value_and_grad(loss, w_max, INT8)

  @jax.jit
  def step(codes, state):
    value, grads = value_and_grad(codes)
    updates, state = tx.update(grads, state, codes)
    return optax.apply_updates(codes, updates), state, value

  initial = float(loss(params))
  for _ in range(300):
    codes, state, value = step(codes, state)
  assert codes["w"].dtype == jnp.int8
  factored_state = state.inner_states["multiplicative"].inner_state[0]
  assert factored_state.row_rms_hat["w"].shape == (24,)
  assert factored_state.col_rms_hat["w"].shape == (16,)
  assert float(value) < 0.05 * initial


# ------------------------------------------------------------ checkpoints


def _checkpoint_round_trip(directory, params, tx, grads_at):
  """3 steps, save, restore into a fresh state, 3 more steps on both."""
  from madam_examples import checkpointing  # pylint: disable=import-outside-toplevel

  @jax.jit
  def step(train_state, t):
    p, s = train_state["params"], train_state["opt_state"]
    updates, s = tx.update(grads_at(p, t), s, p)
    return {"params": optax.apply_updates(p, updates), "opt_state": s}

  fresh = {"params": params, "opt_state": tx.init(params)}
  state = fresh
  for t in range(3):
    state = step(state, t)
  checkpointing.save(directory, 3, state)
  restored = checkpointing.restore(directory, fresh)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  chex.assert_trees_all_equal_shapes(restored, state)
  for t in range(3, 6):
    state = step(state, t)
    restored = step(restored, t)
  chex.assert_trees_all_equal(restored, state)


def test_orbax_round_trip_then_resume_bitwise(tmp_path):
  """Save the params and the factored state (bf16 statistics; int8 codes with
  their PRNG key) after 3 steps, restore into a fresh state, continue: the
  same bits as the uninterrupted run."""
  params = {
    "w": jnp.asarray(
      np.random.default_rng(0).standard_normal((16, 12)), jnp.float32
    ),
    "v": jnp.ones(12),
  }
  cosine = lambda p, t: jax.tree.map(lambda w: jnp.cos(w * (t + 1.0)), p)
  _checkpoint_round_trip(
    tmp_path / "madam", params, factored_madam(state_dtype=jnp.bfloat16), cosine
  )
  codes, w_max = madam_optax.lns_encode_tree(params, INT8)
  _checkpoint_round_trip(
    tmp_path / "lns",
    codes,
    madam_optax.lns_madam(
      INT8, factored=True, min_dim_size_to_factor=MIN_DIM, seed=3
    ),
    lambda c, t: cosine(madam_optax.lns_decode_tree(c, w_max, INT8), t),
  )


# --------------------------------------------------------------- sharding

# name: (shape, spec); "conv" and "dense" are factored over two sharded axes,
# "embed" over a sharded row axis, "batched" is factored over its two last
# axes and sharded over its first (a batch axis), "scale" is full.
LAYOUT = {
  "dense": ((64, 32), P("data", "fsdp")),
  "conv": ((3, 3, 8, 16), P(None, None, "data", "fsdp")),
  "embed": ((96, 16), P(("data", "fsdp"), None)),
  "batched": ((8, 16, 12), P(("data", "fsdp"), None, None)),
  "scale": ((32,), P(("data", "fsdp"))),
}


def host_params(names=tuple(LAYOUT)):
  rng = np.random.default_rng(0)
  return {
    name: rng.standard_normal(LAYOUT[name][0]).astype(np.float32)
    for name in names
  }


def expected_spec(name, statistic):
  """The parameter's spec without the axis the statistic averages over."""
  shape, spec = LAYOUT[name]
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  axes = factored_axes(shape, MIN_DIM)
  if statistic == "rms_hat":
    return spec if axes is None else ()
  if axes is None:
    return ()
  dropped = axes[1] if statistic == "row_rms_hat" else axes[0]
  return tuple(s for d, s in enumerate(spec) if d != dropped)


def normalised(spec, ndim):
  spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


def replicated_rest(state, mesh):
  """Shardings for jit: the state's own where sharded, else replicated."""
  return jax.tree.map(
    lambda x: (
      x.sharding
      if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
      else NamedSharding(mesh, P())
    ),
    state,
  )


def fake_grads(params, t):
  return jax.tree.map(lambda w: 0.1 * jnp.cos(w + 0.1 * t), params)


def compiled_update(tx, mesh, params):
  shardings = {k: NamedSharding(mesh, LAYOUT[k][1]) for k in params}
  state = tx.init(params)
  state_sh = replicated_rest(state, mesh)
  state = jax.device_put(state, state_sh)

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(
    step,
    in_shardings=(shardings, shardings, state_sh),
    out_shardings=(shardings, state_sh),
  )
  compiled = jitted.lower(params, fake_grads(params, 1.0), state).compile()
  return compiled, state


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_statistics_shard_with_their_dimension(eight_devices, axis_type):
  mesh = make_mesh(eight_devices, getattr(jax.sharding.AxisType, axis_type))
  params = jax.device_put(
    host_params(),
    {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()},
  )
  state = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM
  ).init(params)
  for statistic in ("row_rms_hat", "col_rms_hat", "rms_hat"):
    for name, leaf in getattr(state, statistic).items():
      want = expected_spec(name, statistic)
      if leaf.ndim == 0:  # the placeholder of an unused one
        assert want == (), (statistic, name)
        continue
      assert normalised(leaf.sharding.spec, leaf.ndim) == normalised(
        want, leaf.ndim
      ), (statistic, name, leaf.sharding.spec)
  # Every device holds 1/8 of each sharded statistic's entries.
  assert state.row_rms_hat["dense"].addressable_shards[0].data.shape == (32,)
  assert state.col_rms_hat["dense"].addressable_shards[0].data.shape == (8,)
  assert state.row_rms_hat["embed"].addressable_shards[0].data.shape == (12,)


def test_compiled_update_collectives_are_exactly_the_factor_means(
  eight_devices,
):
  """Means over a sharded factored axis are cross-device reductions: the
  update of factored tensors sharded along those axes all-reduces (and does
  nothing else collective); factored tensors sharded only along a batch axis,
  and the full second moment, need no communication at all."""
  mesh = make_mesh(eight_devices)
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()}
  factored = madam_optax.madam(factored=True, min_dim_size_to_factor=MIN_DIM)
  cases = {
    ("dense",): ["all-reduce"],
    ("conv",): ["all-reduce"],
    ("embed",): ["all-reduce"],
    ("batched", "scale"): [],
    tuple(LAYOUT): ["all-reduce"],
  }
  for names, expected in cases.items():
    params = jax.device_put(
      host_params(names), {k: shardings[k] for k in names}
    )
    compiled, _ = compiled_update(factored, mesh, params)
    assert collectives_in(compiled.as_text()) == expected, names
  # The unfactored madam on the same layout: none (the control).
  params = jax.device_put(host_params(), shardings)
  compiled, _ = compiled_update(madam_optax.madam(), mesh, params)
  assert collectives_in(compiled.as_text()) == []


def test_sharded_steps_match_single_device_steps(eight_devices):
  """10 steps on the mesh against 10 on one device, from the same state:
  equal up to the order of the cross-device sums (a few ulps)."""
  mesh = make_mesh(eight_devices)
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()}
  tx = madam_optax.madam(
    factored=True, min_dim_size_to_factor=MIN_DIM, learning_rate=0.05
  )
  host = host_params()
  single = (jax.device_put(host, eight_devices[0]), tx.init(host))
  compiled, state = compiled_update(tx, mesh, jax.device_put(host, shardings))
  sharded = (
    jax.device_put(host, shardings),
    jax.device_put(single[1], jax.tree.map(lambda x: x.sharding, state)),
  )

  @jax.jit
  def single_step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(10):
    single = single_step(single[0], fake_grads(single[0], t), single[1])
    sharded = compiled(sharded[0], fake_grads(sharded[0], t), sharded[1])
  for name in host:
    assert sharded[0][name].sharding.is_equivalent_to(
      shardings[name], host[name].ndim
    )
    assert not np.array_equal(np.asarray(sharded[0][name]), host[name])
  chex.assert_trees_all_close(
    jax.device_get(sharded), jax.device_get(single), rtol=1e-5, atol=0
  )


def test_lns_madam_factored_on_sharded_int8_codes(eight_devices):
  mesh = make_mesh(eight_devices)
  names = ("dense", "embed")
  shardings = {k: NamedSharding(mesh, LAYOUT[k][1]) for k in names}
  codes = jax.jit(
    lambda p: {k: madam_optax.lns_encode(w, INT8)[0] for k, w in p.items()}
  )(host_params(names))
  codes = jax.device_put(jax.device_get(codes), shardings)
  # lr 0.1: 3.15 levels per unit of normalised gradient (0.01 would round
  # to no move at all with nearest rounding).
  tx = madam_optax.lns_madam(
    INT8, 0.1, factored=True, min_dim_size_to_factor=MIN_DIM, rounding="nearest"
  )
  state = tx.init(codes)
  assert normalised(state[0].row_rms_hat["dense"].sharding.spec, 1) == ("data",)
  assert normalised(state[0].col_rms_hat["dense"].sharding.spec, 1) == ("fsdp",)
  state_sh = replicated_rest(state, mesh)
  state = jax.device_put(state, state_sh)

  def step(codes, grads, state):
    updates, state = tx.update(grads, state, codes)
    return optax.apply_updates(codes, updates), state

  grads = jax.device_put(fake_grads(host_params(names), 0.0), shardings)
  jitted = jax.jit(
    step,
    in_shardings=(shardings, shardings, state_sh),
    out_shardings=(shardings, state_sh),
  )
  compiled = jitted.lower(codes, grads, state).compile()
  assert collectives_in(compiled.as_text()) == ["all-reduce"]
  new_codes, _ = compiled(codes, grads, state)
  assert new_codes["dense"].dtype == jnp.int8
  assert not np.array_equal(
    np.asarray(new_codes["dense"]), np.asarray(codes["dense"])
  )


def test_nnx_optimizer_with_partitioned_variables(eight_devices):
  """``nnx.Optimizer`` on ``nnx.with_partitioning`` kernels: the full
  statistic keeps the Variable's sharding metadata, the factored ones are
  plain arrays laid out along their dimension, before and after a step."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  mesh = make_mesh(eight_devices, jax.sharding.AxisType.Auto)

  with jax.set_mesh(mesh):
    model = partitioned_mlp(nnx.initializers.ones_init())
    optimizer = nnx.Optimizer(model, factored_madam(), wrt=nnx.Param)

    def specs():
      state = nnx.as_pure(nnx.state(optimizer))["opt_state"][0]
      return {
        (statistic, layer, kind): normalised(leaf.sharding.spec, leaf.ndim)
        for statistic in ("row_rms_hat", "col_rms_hat", "rms_hat")
        for layer, kind in (("l1", "kernel"), ("l1", "bias"), ("l2", "kernel"))
        for leaf in [getattr(state, statistic)[layer][kind]]
        if leaf.ndim
      }

    # l1's kernel is (16, 32) over (None, "fsdp"), l2's (32, 8) over
    # ("fsdp", None); the 1-D bias keeps a full statistic, sharded like it.
    expected = {
      ("row_rms_hat", "l1", "kernel"): (),
      ("col_rms_hat", "l1", "kernel"): ("fsdp",),
      ("row_rms_hat", "l2", "kernel"): ("fsdp",),
      ("col_rms_hat", "l2", "kernel"): (),
      ("rms_hat", "l1", "bias"): ("fsdp",),
    }
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))

    @nnx.jit
    def train_step(model, optimizer, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    for _ in range(2):
      assert specs() == expected
      train_step(model, optimizer, x)


def test_flax_nnx_state_of_variables_as_params():
  """Params as an ``nnx.State`` of ``Variable``s (what ``nnx.split`` gives and
  the examples' trainers pass, unwrapped nowhere): the factored statistics are
  plain arrays, the full ones keep the Variables, and every step equals the
  step on the same tree with the Variables unwrapped (``nnx.as_pure``)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(16, 12, rngs=rngs)
      self.norm = nnx.LayerNorm(12, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  graphdef, params = nnx.split(Model(nnx.Rngs(0)))
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((8, 16)), jnp.float32
  )

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

  def trainer(params):
    tx = madam_optax.with_additive_fallback(
      params, factored_madam(), optax.adam(1e-3)
    )

    @jax.jit
    def step(params, state):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    return tx.init(params), step

  pure = nnx.as_pure(params)
  state, step = trainer(params)
  pure_state, pure_step = trainer(pure)
  inner = state.inner_states["multiplicative"].inner_state[0]
  assert isinstance(inner.row_rms_hat["dense"]["kernel"], jax.Array)
  assert isinstance(inner.rms_hat["norm"]["scale"], nnx.Variable)
  for _ in range(3):
    params, state = step(params, state)
    pure, pure_state = pure_step(pure, pure_state)
  assert isinstance(params["dense"]["kernel"], nnx.Variable)
  chex.assert_trees_all_equal(nnx.as_pure(params), pure)
  chex.assert_trees_all_equal(nnx.as_pure(state), nnx.as_pure(pure_state))
