"""The LNS module: the format, encode/decode, grid projection, log_quantise
and lns_level_step (SPEC §2).

Their share of the contract and of the invariants (codes on the grid and in
range) runs from the registry (``test_contract.py``, ``test_properties.py``).
"""

import decimal
import math

import chex
from hypothesis import given
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax import LNSFormat

# ================================================= format, encode, decode


@pytest.mark.parametrize(
  "levels, dtype",
  [
    (2, np.int8),
    (127, np.int8),
    (128, np.int16),
    (4096, np.int16),
    (32767, np.int16),
  ],
)
def test_storage_dtype(levels, dtype):
  fmt = LNSFormat.spanning(levels)
  assert fmt.dtype == np.dtype(dtype)
  codes, _ = madam_optax.lns_encode(jnp.linspace(-1.0, 1.0, 11), fmt)
  assert codes.dtype == np.dtype(dtype)


@given(
  levels=st.integers(2, 5000),
  log_range=st.floats(0.5, 12.0),
  seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_within_half_a_level(levels, log_range, seed):
  fmt = LNSFormat.spanning(levels, log_range)
  rng = np.random.default_rng(seed)
  scale = 2.0
  # magnitudes inside the grid's range, both signs
  log_mag = rng.uniform(-log_range, 0.0, 300)
  w = (rng.choice([-1.0, 1.0], 300) * scale * np.exp(log_mag)).astype(
    np.float32
  )
  codes, s = madam_optax.lns_encode(jnp.asarray(w), fmt, scale)
  back = np.asarray(madam_optax.lns_decode(codes, s, fmt))
  np.testing.assert_array_equal(np.sign(back), np.sign(w))
  err = np.abs(np.log(np.abs(back)) - np.log(np.abs(w)))
  assert err.max() <= fmt.log_base / 2 + 1e-5
  c = np.asarray(codes).astype(np.int64)
  assert np.all((np.abs(c) >= 1) & (np.abs(c) <= levels))


def test_range_clamps_and_zero():
  fmt = LNSFormat(levels=10, base=2.0)
  w = jnp.array([5.0, -5.0, 1e-9, -1e-9, 0.0, 1.0])
  codes, _ = madam_optax.lns_encode(w, fmt, 1.0)
  chex.assert_trees_all_equal(
    codes, jnp.array([10, -10, 1, -1, 0, 10], jnp.int8)
  )
  back = madam_optax.lns_decode(codes, 1.0, fmt)
  np.testing.assert_allclose(back, [1, -1, 2.0**-9, -(2.0**-9), 0, 1])


@pytest.mark.parametrize("levels", [127, 4096])
def test_every_code_decodes_and_reencodes_to_itself(levels):
  fmt = LNSFormat.spanning(levels)
  codes = jnp.arange(-levels, levels + 1).astype(fmt.dtype)
  w = madam_optax.lns_decode(codes, 0.7, fmt)
  again, _ = madam_optax.lns_encode(w, fmt, 0.7)
  chex.assert_trees_all_equal(again, codes)
  assert np.all(np.diff(np.asarray(w)) > 0)  # codes are ordered like weights


@pytest.mark.parametrize(
  "fmt",
  [
    LNSFormat.spanning(1000, 20.0),
    LNSFormat.spanning(127),
    LNSFormat(levels=32767, base=1.0003),
    LNSFormat(levels=5, base=1000.0),
  ],
  ids=str,
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_decoded_values_are_within_a_few_ulps_of_the_grid(fmt, dtype):
  """Every code decodes to ``sign(c) w_max base**(|c| - levels)`` within
  two ulps in float32 and three in float64 (against 40 digits; measured:
  1.7 and 2.4). ``exp((|c| - levels) log(base))`` rounded its argument: up
  to 28 float32 ulps with 1000 levels spanning e**20, 4.7 with
  ``LNSFormat.spanning(127)``."""
  context = decimal.Context(prec=40)
  ln_base = context.ln(decimal.Decimal(fmt.base))
  allowed = 2 if dtype == jnp.float32 else 3
  with jax.enable_x64(dtype == jnp.float64):
    # Every code, or every 32nd (and the ends) of 32767 levels.
    codes = np.arange(-fmt.levels, fmt.levels + 1)[:: 1 + fmt.levels // 2000]
    codes = jnp.asarray(np.union1d(codes, [-fmt.levels, 0, fmt.levels]))
    codes = codes.astype(fmt.dtype)
    for w_max in [1000.0, 0.037]:
      got = np.asarray(madam_optax.lns_decode(codes, w_max, fmt, dtype))
      assert got.dtype == dtype
      assert got[np.asarray(codes) == 0] == 0.0
      for code, value in zip(np.asarray(codes).tolist(), got.tolist()):
        if code == 0:
          continue
        power = context.exp(ln_base * (abs(code) - fmt.levels))
        exact = context.multiply(decimal.Decimal(w_max), power)
        exact = exact.copy_sign(decimal.Decimal(code))
        ulp = float(np.spacing(np.abs(dtype(float(exact)))))
        error = abs(decimal.Decimal(value) - exact)
        assert error <= allowed * decimal.Decimal(ulp), (code, value, exact)


def test_default_scale_is_p_scale_rms():
  w = jnp.array([3.0, -4.0])
  _, scale = madam_optax.lns_encode(w, LNSFormat.spanning(16), p_scale=2.0)
  np.testing.assert_allclose(scale, 2.0 * math.sqrt(12.5), rtol=1e-6)


def test_reference_format():
  fmt = madam_optax.REFERENCE_FORMAT
  assert fmt.levels == 4096 and fmt.dtype == np.int16
  assert math.isclose(fmt.log_base, 0.001, rel_tol=1e-12)


def test_tree_round_trip_keeps_float_leaves():
  fmt = LNSFormat.spanning(127)
  params = {
    "w": jnp.array([[0.3, -0.2], [0.1, 0.5]]),
    "b": jnp.zeros(2),
    "s": jnp.ones(3),
  }
  codes, scales = madam_optax.lns_encode_tree(params, fmt, min_ndim=2)
  assert codes["w"].dtype == jnp.int8
  assert codes["b"] is params["b"] and codes["s"] is params["s"]
  assert scales["b"] is None and scales["s"] is None
  back = madam_optax.lns_decode_tree(codes, scales, fmt)
  np.testing.assert_allclose(back["w"], params["w"], rtol=fmt.log_base)
  chex.assert_trees_all_equal(back["b"], params["b"])


@pytest.mark.parametrize(
  "w", [jnp.array([1, 2]), np.array([1, 2], np.int8), jnp.array([True])]
)
def test_encode_rejects_non_float(w):
  with pytest.raises(ValueError, match="floating-point weights"):
    madam_optax.lns_encode(w, LNSFormat.spanning(16))


def test_encode_tree_rejects_non_float():
  with pytest.raises(ValueError, match=r"\['w'\].*int32"):
    madam_optax.lns_encode_tree(
      {"w": jnp.array([1, 2])}, LNSFormat.spanning(16)
    )


@pytest.mark.parametrize("levels", [0, 1, 32768, 100000, 2.5])
def test_levels_beyond_the_dtype(levels):
  with pytest.raises(ValueError, match="levels"):
    LNSFormat(levels=levels, base=1.1).dtype
  with pytest.raises(ValueError, match="levels"):
    madam_optax.lns_encode(jnp.ones(2), LNSFormat(levels=levels, base=1.1))


@pytest.mark.parametrize("base", [1.0, 0.5, -2.0, float("inf")])
def test_bad_base(base):
  with pytest.raises(ValueError, match="base"):
    madam_optax.lns_encode(jnp.ones(2), LNSFormat(levels=16, base=base))


def test_zero_scale():
  fmt = LNSFormat.spanning(16)
  with pytest.raises(ValueError, match="max_magnitude.*all-zero"):
    madam_optax.lns_encode(jnp.zeros(3), fmt)
  with pytest.raises(ValueError, match="max_magnitude"):
    madam_optax.lns_encode(jnp.ones(3), fmt, 0.0)


def test_decode_rejects_float_codes():
  with pytest.raises(ValueError, match="integer codes"):
    madam_optax.lns_decode(jnp.ones(2), 1.0, LNSFormat.spanning(16))


def test_readme_lns_example_runs():
  """The code block of the README's LNS section, on a small regression."""
  import pathlib  # pylint: disable=import-outside-toplevel

  readme = (
    pathlib.Path(__file__).resolve().parents[1] / "README.md"
  ).read_text()
  section = readme.split("<!-- section:lns -->", 1)[1]
  section = section.split("<!-- section:", 1)[0]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  params = {
    "w": jax.random.normal(jax.random.key(0), (4, 3)),
    "b": jnp.zeros(3),
  }
  batch = jnp.ones((2, 4))
  namespace = {
    "params": params,
    "batch": batch,
    "loss_fn": lambda p, x: jnp.sum((x @ p["w"] + p["b"]) ** 2),
  }
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["codes"]["w"].dtype == jnp.int8
  assert namespace["codes"]["b"].dtype == jnp.float32
  assert namespace["loss"] > 0


# ============================================ log_quantise (float params)


def per_tensor_scalars(state):
  """The float scalars of a ``log_quantise`` state: one w_max per tensor."""
  return [
    x
    for x in jax.tree.leaves(state)
    if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.floating)
  ]


def max_magnitudes(state):
  return [float(x) for x in per_tensor_scalars(state)]


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


@given(
  levels=st.integers(2, 4096),
  log_range=st.floats(0.5, 10.0),
  rounding=st.sampled_from(["nearest", "stochastic"]),
  seed=st.integers(0, 1000),
)
def test_output_always_on_grid(levels, log_range, rounding, seed):
  fmt = LNSFormat.spanning(levels, log_range)
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(40,)), jnp.float32)}
  tx = madam_optax.log_quantise(fmt, rounding=rounding, seed=seed)
  state = tx.init(params)
  (scale,) = max_magnitudes(state)
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
  np.testing.assert_allclose(
    w + u["w"], madam_optax.lns_decode(codes, scale, fmt), rtol=1e-6
  )


def test_stochastic_rounding_is_unbiased_in_the_level():
  # Every entry sits 0.3 of a level below grid level 5 (i.e. at level 5.3).
  # Tolerance: 5 standard errors of the mean of N Bernoulli(0.3) draws.
  fmt = LNSFormat(levels=16, base=2.0)
  n = 40_000
  x = jnp.full((n,), 2.0**-5.3)
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
  assert means[0] != means[1]  # the key in the state moved on


def test_nearest_is_deterministic_and_rounds_half_a_level():
  fmt = LNSFormat(levels=16, base=2.0)
  tx = madam_optax.log_quantise(fmt, max_magnitude=1.0)
  w = {"w": jnp.array([2.0**-5.4, 2.0**-5.6, -(2.0**-20), 0.0])}
  state = tx.init(w)
  u, state = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
  np.testing.assert_allclose(
    w["w"] + u["w"], [2.0**-5, 2.0**-6, -(2.0**-15), 0.0], rtol=1e-6
  )


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_grid_top_at_the_dtype_maximum_is_reached_not_passed(rounding):
  # w + (top - w) rounds one ulp above top when w and top are more than a
  # factor of two apart; with top = float32's largest value that was inf.
  top = float(np.finfo(np.float32).max)
  fmt = LNSFormat(levels=16, base=2.0)
  tx = madam_optax.log_quantise(fmt, rounding=rounding, max_magnitude=top)
  w = {"w": jnp.array([1.2527e38, -1.2503e38, 1.0e38, 3.0e38], jnp.float32)}
  state = tx.init(w)
  g = jnp.sign(w["w"]) * (top - jnp.abs(w["w"]))  # w + g is about +-top
  u, _ = tx.update({"w": g}, state, w)
  after = np.asarray(optax.apply_updates(w, u)["w"])
  assert np.all(np.isfinite(after)), after
  # On the top level, or one ulp below it where w + delta cannot be exact.
  below = np.nextafter(np.float32(top), np.float32(0))
  assert np.all((np.abs(after) == top) | (np.abs(after) == below)), after


def test_projects_adam_under_jit():
  fmt = LNSFormat.spanning(32)
  params = {"w": jax.random.normal(jax.random.key(1), (5, 3))}
  tx = optax.chain(optax.adam(0.1), madam_optax.log_quantise(fmt))
  state = tx.init(params)
  (scale,) = max_magnitudes(state[1])

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: jnp.sum((p["w"] - 0.3) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(5):
    prev = params["w"]
    params, state = step(params, state)
  _assert_on_grid(params["w"], scale, fmt, prev)
  assert [x.dtype for x in per_tensor_scalars(state[1])] == [jnp.float32]


def test_log_quantise_errors():
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


# ============================================================ lns_level_step


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
    moves = -np.asarray(u["w"], np.int64)  # k grows: |c| shrinks
    assert set(np.unique(moves)) <= {0, 1}
    means.append(moves.mean())
    assert abs(moves.mean() - 0.37) < 5 * se, (moves.mean(), se)
  assert len(set(means)) == 3  # fresh randomness each step


def test_nearest_level_step_steps_and_clamps():
  fmt = LNSFormat(levels=100, base=1.01)
  tx = madam_optax.lns_level_step(fmt, 0.03, rounding="nearest")
  codes = {"w": jnp.array([50, -50, 99, 2, 0], jnp.int8)}
  g = {"w": jnp.array([1.0, 1.0, -1.0, 2.0, 5.0])}
  u, _ = tx.update(g, tx.init(codes), codes)
  # 0.03 / log(1.01) = 3.015 levels per unit; |c| = levels - k.
  chex.assert_trees_all_equal(
    optax.apply_updates(codes, u),
    {"w": jnp.array([47, -53, 100, 1, 0], jnp.int8)},
  )


@pytest.mark.parametrize("magnitude", [1e-37, 3e-37, 1e30])
def test_tiny_and_huge_gradients_step_the_codes_as_gradients_of_one(magnitude):
  """The integer rule sees only g / sqrt(v_hat): constant float32 gradients
  of 1e-37 (whose sqrt(v) would be subnormal) step the codes as 1.0 does."""
  tx = jax.jit(madam_optax.lns_madam_reference().update)
  paths = {}
  for scale in (1.0, magnitude):
    codes = {"w": jnp.full((6,), 60, jnp.int16)}
    state = madam_optax.lns_madam_reference().init(codes)
    path = []
    for _ in range(4):
      grads = {"w": jnp.full((6,), scale, jnp.float32)}
      updates, state = tx(grads, state, codes)
      codes = optax.apply_updates(codes, updates)
      path.append(np.asarray(codes["w"]))
    paths[scale] = np.stack(path)
  np.testing.assert_array_equal(paths[magnitude], paths[1.0])
  assert paths[1.0][-1, 0] < 60  # the codes moved
