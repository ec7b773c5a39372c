"""No silent wrong results: each input trains correctly or fails clearly.

One regression test (or a small group) per case of the robustness report:
1. non-finite gradients, learning rates and weights with LNS codes;
2. hyperparameters cast by ``optax.inject_hyperparams`` to the params' dtype;
3. ``b2`` that rounds to 1 in float32;
4. weight bounds of tensors near the top of the float range;
5. LNS scales of tensors with tiny or huge RMS;
6. smaller items: ``jax.grad`` through ``clip_weight_magnitude``, Python
   float leaves, ``reduce_on_plateau`` with LNS codes, injected bounds, and
   the documented limits of tiny and low-precision weights.
"""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax import LNSFormat

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


FMT = LNSFormat.spanning(127)  # int8 codes
FMT16 = LNSFormat.spanning(1000)  # int16 codes


def _step(tx, grads, params, state=None, jit=False):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(grads, state, params)
  return optax.apply_updates(params, updates), updates, state


# 1. Non-finite input never corrupts LNS codes silently.


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lns_madam_keeps_the_code_of_a_non_finite_gradient(bad, jit):
  codes = {"w": jnp.array([50, -50, 60, 0], jnp.int8)}
  tx = madam_optax.lns_madam(FMT, 0.1, rounding="nearest")
  grads = {"w": jnp.array([bad, 1.0, -1.0, 1.0])}
  new, _, state = _step(tx, grads, codes, jit=jit)
  np.testing.assert_array_equal(new["w"][:1], [50])  # unchanged, not 0
  assert new["w"][1] != -50 and new["w"][2] != 60  # the others moved
  # The second moment of the bad entry was not poisoned (NaN would freeze
  # the code, inf zero every later step): at step 2, with no earlier
  # gradient, g_n = sqrt(1 - b2**2) / sqrt(1 - b2) = sqrt(1 + b2).
  again, _, _ = _step(
    tx, {"w": jnp.array([1.0, 1.0, -1.0, 1.0])}, new, state, jit=jit
  )
  assert again["w"][0] == 50 - round(0.1 * math.sqrt(1.999) / FMT.log_base)


@pytest.mark.parametrize("jit", [False, True])
def test_lns_madam_keeps_codes_under_a_nan_learning_rate(jit):
  codes = {"w": jnp.array([50, -50, 60], jnp.int8)}
  tx = madam_optax.lns_madam(
    FMT, lambda count: jnp.nan * count, rounding="nearest"
  )
  new, _, _ = _step(tx, {"w": jnp.ones(3)}, codes, jit=jit)
  np.testing.assert_array_equal(new["w"], codes["w"])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lns_level_step_keeps_the_code_of_a_non_finite_update(rounding):
  codes = {"w": jnp.array([5, -5, 0, 100, 7], jnp.int8)}
  tx = madam_optax.lns_level_step(FMT, 0.1, rounding=rounding)
  grads = {"w": jnp.array([np.nan, np.inf, np.inf, -np.inf, 1.0])}
  new, updates, _ = _step(tx, grads, codes, jit=True)
  np.testing.assert_array_equal(updates["w"][:4], 0)
  assert updates["w"].dtype == jnp.int8 and new["w"][4] != 7


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_log_quantise_keeps_the_weight_of_a_non_finite_update(rounding):
  tx = madam_optax.log_quantise(FMT, rounding=rounding, max_magnitude=1.0)
  params = {"w": jnp.array([0.5, -0.25, 0.125, 0.9])}
  grads = {"w": jnp.array([np.nan, np.inf, -np.inf, 0.0])}
  new, _, _ = _step(tx, grads, params, jit=True)
  np.testing.assert_array_equal(new["w"][:3], params["w"][:3])
  assert jnp.all(jnp.isfinite(new["w"]))


def test_lns_encode_refuses_nan_weights_when_concrete():
  w = jnp.array([[0.5, np.nan], [1.0, -2.0]])
  with pytest.raises(ValueError, match=r"non-finite.*index \(0, 1\)"):
    madam_optax.lns_encode(w, FMT, 1.0)
  with pytest.raises(ValueError, match=r"non-finite"):
    madam_optax.lns_encode(w, FMT)
  with pytest.raises(
    ValueError, match=r"leaf \['dense'\]\['kernel'\].*non-finite"
  ):
    madam_optax.lns_encode_tree({"dense": {"kernel": w}}, FMT)


def test_lns_encode_maps_non_finite_weights_deterministically_under_jit():
  w = jnp.array([np.nan, np.inf, -np.inf, 0.0, 0.5])
  codes, _ = jax.jit(lambda w: madam_optax.lns_encode(w, FMT, 1.0))(w)
  np.testing.assert_array_equal(codes[:4], [0, 127, -127, 0])


def _guarded_cases():
  params = {"w": jnp.array([[0.5, -1.0], [0.25, 2.0]]), "v": jnp.array([3.0])}
  codes, _ = madam_optax.lns_encode_tree(params, FMT)
  codes16, _ = madam_optax.lns_encode_tree(params, madam_optax.REFERENCE_FORMAT)
  with_bias = dict(codes, b=jnp.zeros(2))
  return {
    "madam": (madam_optax.madam(), params),
    "scale_by_second_moment": (madam_optax.scale_by_second_moment(), params),
    "multiplicative_step": (madam_optax.multiplicative_step(), params),
    "clip_weight_magnitude": (madam_optax.clip_weight_magnitude(), params),
    "log_quantise": (
      optax.chain(madam_optax.madam(), madam_optax.log_quantise(FMT)),
      params,
    ),
    "lns_madam": (madam_optax.lns_madam(FMT), codes),
    "lns_level_step": (madam_optax.lns_level_step(FMT), codes),
    "lns_madam_reference": (madam_optax.lns_madam_reference(), codes16),
    "with_additive_fallback": (
      madam_optax.with_additive_fallback(
        with_bias, madam_optax.lns_madam(FMT), optax.adam(1e-2)
      ),
      with_bias,
    ),
  }


@pytest.mark.parametrize("name", list(_guarded_cases()))
def test_apply_if_finite_guards_every_optimizer(name):
  """The documented guard: a bad step changes nothing, a good one is plain."""
  tx, params = _guarded_cases()[name]
  guarded = madam_optax.apply_if_finite(tx, max_consecutive_errors=2)
  grads = jax.tree.map(lambda p: jnp.full(jnp.shape(p), 0.3), params)
  bad = jax.tree.map(lambda g: g.at[..., 0].set(jnp.nan), grads)
  state = guarded.init(params)
  new, updates, new_state = _step(guarded, bad, params, state, jit=True)
  chex.assert_trees_all_equal(new, params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1
  # A finite step is the unguarded step.
  new, _, _ = _step(guarded, grads, params, new_state, jit=True)
  plain, _, _ = _step(tx, grads, params, jit=True)
  chex.assert_trees_all_equal(new, plain)


def test_optax_apply_if_finite_cannot_wrap_lns_madam_as_documented():
  codes = {"w": jnp.array([50, -50], jnp.int8)}
  tx = optax.apply_if_finite(madam_optax.lns_madam(FMT), 2)
  with pytest.raises(TypeError, match="cond branches"):
    tx.update({"w": jnp.ones(2)}, tx.init(codes), codes)
  assert "optax.apply_if_finite`` cannot wrap" in madam_optax.lns_madam.__doc__


# 2. Hyperparameters keep their own precision whatever the params' dtype.


def _float_params(dtype):
  rng = np.random.default_rng(0)
  return {
    "kernel": jnp.asarray(rng.standard_normal((4, 3)), dtype),
    "scale": jnp.asarray(1.5, dtype),
  }


def _float_grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
  )


def _code_params(fmt):
  return madam_optax.lns_encode_tree(_float_params(jnp.float32), fmt)[0]


def _log_quantise(p_scale=3.0, max_magnitude=None, seed=0):
  return madam_optax.log_quantise(
    FMT, p_scale=p_scale, seed=seed, max_magnitude=max_magnitude
  )


# factory, hyperparameters (values exact in float32 and bfloat16).
FLOAT_TRANSFORMS = {
  "madam": (
    madam_optax.madam,
    {"learning_rate": 0.03125, "p_scale": 2.0, "g_bound": 0.75, "b2": 0.9},
  ),
  "scale_by_second_moment": (madam_optax.scale_by_second_moment, {"b2": 0.9}),
  "multiplicative_step": (
    madam_optax.multiplicative_step,
    {"learning_rate": 0.0625},
  ),
  "clip_weight_magnitude": (
    madam_optax.clip_weight_magnitude,
    {"p_scale": 0.75},
  ),
  "log_quantise": (_log_quantise, {"p_scale": 1.5}),
}
LNS_TRANSFORMS = {
  "lns_madam": (
    madam_optax.lns_madam,
    {"learning_rate": 0.0625, "g_bound": 5.0, "b2": 0.875},
  ),
  "lns_level_step": (madam_optax.lns_level_step, {"learning_rate": 0.0625}),
}


def _run_steps(tx, params, grads_fn, steps=3, jit=False):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for i in range(steps):
    updates, state = update(grads_fn(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _float_case(name, dtype):
  factory, hyper = FLOAT_TRANSFORMS[name]
  wrap = lambda tx: (
    optax.chain(tx, optax.scale(-0.01))
    if name == "scale_by_second_moment"
    else tx
  )
  return factory, hyper, wrap


@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64]
)
@pytest.mark.parametrize("name", list(FLOAT_TRANSFORMS))
def test_inject_hyperparams_gives_the_plain_result_for_float_params(
  name, dtype
):
  factory, hyper, wrap = _float_case(name, dtype)
  # float32 and float64 params need nothing; narrower ones hyperparam_dtype.
  narrow = jnp.dtype(dtype).itemsize < 4
  with jax.enable_x64(dtype == jnp.float64):
    params = _float_params(dtype)
    injected_tx = optax.inject_hyperparams(
      factory, hyperparam_dtype=jnp.float32 if narrow else None
    )(**hyper)
    # Same mode on both sides: XLA may keep bfloat16 intermediates in
    # float32 under jit, so jit and eager may differ by a rounding.
    for jit in (False, True):
      plain = _run_steps(wrap(factory(**hyper)), params, _float_grads, jit=jit)
      injected = _run_steps(wrap(injected_tx), params, _float_grads, jit=jit)
      chex.assert_trees_all_equal(plain, injected)


@pytest.mark.parametrize("fmt", [FMT, FMT16], ids=["int8", "int16"])
@pytest.mark.parametrize("name", list(LNS_TRANSFORMS))
def test_inject_hyperparams_gives_the_plain_result_for_codes(name, fmt):
  factory, hyper = LNS_TRANSFORMS[name]
  codes = _code_params(fmt)
  grads = lambda p, i: _float_grads(jax.tree.map(jnp.float32, p), i)
  plain = _run_steps(factory(fmt, **hyper, rounding="nearest"), codes, grads)
  injected = _run_steps(
    optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
      fmt, **hyper, rounding="nearest"
    ),
    codes,
    grads,
  )
  chex.assert_trees_all_equal(plain, injected)
  chex.assert_trees_all_equal_dtypes(injected, codes)
  assert any(
    np.any(np.asarray(a) != np.asarray(b))
    for a, b in zip(jax.tree.leaves(injected), jax.tree.leaves(codes))
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(FLOAT_TRANSFORMS))
def test_inject_hyperparams_refuses_hyperparameters_rounded_to_low_precision(
  name, dtype
):
  factory, hyper, _ = _float_case(name, dtype)
  tx = optax.inject_hyperparams(factory)(**hyper)
  with pytest.raises(
    ValueError, match=r"arrived as a .*float.*hyperparam_dtype"
  ):
    tx.init(_float_params(dtype))


@pytest.mark.parametrize("fmt", [FMT, FMT16], ids=["int8", "int16"])
@pytest.mark.parametrize("name", list(LNS_TRANSFORMS))
def test_inject_hyperparams_refuses_hyperparameters_cast_to_integer_codes(
  name, fmt
):
  factory, hyper = LNS_TRANSFORMS[name]
  tx = optax.inject_hyperparams(factory)(fmt, **hyper)
  with pytest.raises(ValueError, match=r"arrived as an int.*hyperparam_dtype"):
    tx.init(_code_params(fmt))


def test_schedules_returning_low_precision_are_refused():
  tx = madam_optax.multiplicative_step(
    lambda count: jnp.asarray(0.01, jnp.bfloat16)
  )
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="learning_rate.*bfloat16"):
    tx.update(params, tx.init(params), params)


def test_bfloat16_hyperparameters_are_range_checked():
  # A bfloat16 array used to escape the range checks altogether.
  with pytest.raises(ValueError, match="b2"):
    madam_optax.madam(b2=jnp.asarray(1.0, jnp.bfloat16))


# 3. b2 that rounds to 1 in float32.


@pytest.mark.parametrize(
  "b2", [1 - 1e-8, 1 - 2e-8, float(np.nextafter(1.0, 0.0))]
)
@pytest.mark.parametrize(
  "factory",
  [
    madam_optax.madam,
    madam_optax.scale_by_second_moment,
    lambda b2: madam_optax.lns_madam(FMT, b2=b2),
  ],
)
def test_b2_that_rounds_to_one_in_float32_is_refused(factory, b2):
  with pytest.raises(ValueError, match="b2=.*rounds to 1.0 in float32"):
    factory(b2=b2)


def test_largest_b2_below_one_in_float32_still_trains():
  b2 = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
  params = {"w": jnp.array([1.0, -2.0])}
  new, _, _ = _step(madam_optax.madam(b2=b2), {"w": jnp.ones(2)}, params)
  assert jnp.all(new["w"] != params["w"])


# 4. Bounds of tensors near the largest finite value.


@pytest.mark.parametrize(
  "dtype, top",
  [
    (jnp.float32, 8.6e37),
    (jnp.float32, 3.0e38),
    (jnp.float64, 1.0e308),
    (jnp.float16, 6.0e4),
    (jnp.bfloat16, 3.0e38),
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_madam_keeps_huge_weights(dtype, top, jit):
  with jax.enable_x64(dtype == jnp.float64):
    w = jnp.asarray(np.array([top, -top / 2, top / 7]), dtype)
    params = {"w": w}
    new, _, state = _step(
      madam_optax.madam(), {"w": jnp.ones(3, dtype)}, params, jit=jit
    )
    bound = state[-1].max_magnitude["w"]
    assert np.isfinite(float(bound)) and float(bound) > 0
    got = np.asarray(new["w"], np.float64)
    want = np.asarray(w, np.float64) * np.exp(-0.01 * np.sign(w))
    np.testing.assert_allclose(got, want, rtol=4 * float(jnp.finfo(dtype).eps))


# 5. LNS scales of tensors with tiny or huge RMS.


@pytest.mark.parametrize(
  "dtype, scale",
  [
    (jnp.float32, 1e-30),
    (jnp.float32, 1e30),
    (jnp.float32, 1e38),
    (jnp.float16, 1e-3),
    (jnp.float16, 3e4),
    (jnp.bfloat16, 1e-30),
    (jnp.float64, 1e-300),
    (jnp.float64, 1e300),
  ],
)
def test_lns_encode_handles_any_finite_scale(dtype, scale):
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(0)
    w = jnp.asarray(
      rng.uniform(0.5, 1.0, 16) * np.sign(rng.standard_normal(16)) * scale,
      dtype,
    )
    fmt = LNSFormat.spanning(127, log_range=2.0)  # every entry in range
    codes, w_max = madam_optax.lns_encode(w, fmt)
    assert np.isfinite(float(w_max)) and float(w_max) > 0
    decoded = madam_optax.lns_decode(
      codes, w_max, fmt, jnp.float64 if dtype == jnp.float64 else jnp.float32
    )
    exact = np.asarray(w, np.float64)
    err = np.abs(
      np.log(np.abs(np.asarray(decoded, np.float64))) - np.log(np.abs(exact))
    )
    # Half a level, and the float32 rounding of the decoded value.
    assert np.all(err <= fmt.log_base / 2 + 1e-5), err.max()
    np.testing.assert_array_equal(np.sign(decoded), np.sign(exact))
    tree_codes, _ = madam_optax.lns_encode_tree({"w": w}, fmt)
    np.testing.assert_array_equal(tree_codes["w"], codes)


# 6. Smaller items.


def test_grad_through_clip_weight_magnitude_init_and_update():
  tx = madam_optax.clip_weight_magnitude(p_scale=1.0)

  def clipped_sum(w):
    params = {"w": w}
    updates, _ = tx.update({"w": 3.0 * w}, tx.init(params), params)
    return jnp.sum(optax.apply_updates(params, updates)["w"])

  w = jnp.array([1.0, -2.0, 0.5])
  grad = jax.grad(clipped_sum)(w)
  # Every entry is clipped to +-rms(w): d/dw_i sum(sign(w) * rms) is
  # sum(sign(w)) * w_i / (n * rms).
  rms = jnp.sqrt(jnp.mean(w**2))
  np.testing.assert_allclose(
    grad, jnp.sum(jnp.sign(w)) * w / (3 * rms), rtol=1e-6
  )


@pytest.mark.parametrize(
  "name",
  [
    "madam",
    "scale_by_second_moment",
    "multiplicative_step",
    "clip_weight_magnitude",
    "log_quantise",
  ],
)
def test_python_float_leaves(name):
  factory, _, wrap = _float_case(name, jnp.float32)
  tx = wrap(factory())
  params = {"w": 2.0, "v": jnp.array([1.0, -0.5])}
  grads = {"w": 0.5, "v": jnp.array([1.0, 1.0])}
  new, _, _ = _step(tx, grads, params)
  array_params = jax.tree.map(jnp.asarray, params)
  want, _, _ = _step(tx, jax.tree.map(jnp.asarray, grads), array_params)
  chex.assert_trees_all_equal(jax.tree.map(jnp.asarray, new), want)


def test_lns_madam_python_int_code_leaf():
  tx = madam_optax.lns_madam(FMT, 0.1, rounding="nearest")
  new, _, _ = _step(tx, {"w": 1.0}, {"w": 50})
  assert int(new["w"]) == 50 - round(0.1 / FMT.log_base)


def test_reduce_on_plateau_drives_an_injected_lns_learning_rate():
  """The documented recipe; chaining reduce_on_plateau after lns_madam fails
  inside optax (it casts inf to the params' integer dtype) and would scale
  integer code changes."""
  assert "reduce_on_plateau" in madam_optax.lns_madam.__doc__
  codes = {"w": jnp.array([60, -60, 90], jnp.int8)}
  with pytest.raises(OverflowError):
    optax.chain(
      madam_optax.lns_madam(FMT), optax.contrib.reduce_on_plateau()
    ).init(codes)
  tx = optax.inject_hyperparams(
    madam_optax.lns_madam, hyperparam_dtype=jnp.float32
  )(FMT, learning_rate=0.2, rounding="nearest")
  plateau = optax.contrib.reduce_on_plateau(factor=0.1, patience=1)
  state, plateau_state = tx.init(codes), plateau.init(jnp.zeros([]))
  moves = []
  for _ in range(6):
    loss = jnp.float32(1.0)  # a plateau
    _, plateau_state = plateau.update(jnp.zeros([]), plateau_state, value=loss)
    state.hyperparams["learning_rate"] = 0.2 * plateau_state.scale
    updates, state = tx.update({"w": jnp.ones(3)}, state, codes)
    codes = optax.apply_updates(codes, updates)
    moves.append(int(jnp.max(jnp.abs(updates["w"]))))
  assert moves[0] == round(0.2 / FMT.log_base) and moves[-1] == 0, moves


# Each grows both magnitudes (w = [0.5, -0.5]) past 0.25 without a sign change.
MAX_MAGNITUDE_CASES = {
  "clip_weight_magnitude": (
    lambda m: madam_optax.clip_weight_magnitude(max_magnitude=m),
    [0.5, -0.5],
  ),
  "madam": (lambda m: madam_optax.madam(max_magnitude=m), [-1.0, 1.0]),
  "log_quantise": (
    lambda m: optax.chain(
      optax.sgd(1.0), madam_optax.log_quantise(FMT, max_magnitude=m)
    ),
    [-0.5, 0.5],
  ),
}


@pytest.mark.parametrize("name", list(MAX_MAGNITUDE_CASES))
def test_injected_max_magnitude_takes_effect_after_init(name):
  make, grads = MAX_MAGNITUDE_CASES[name]
  params = {"w": jnp.array([0.5, -0.5])}
  tx = optax.inject_hyperparams(lambda max_magnitude: make(max_magnitude))(
    max_magnitude=1.0
  )
  state = tx.init(params)
  state.hyperparams["max_magnitude"] = jnp.float32(0.25)
  new, _, _ = _step(tx, {"w": jnp.array(grads)}, params, state, jit=True)
  np.testing.assert_array_equal(np.sign(new["w"]), np.sign(params["w"]))
  assert np.all(np.abs(np.asarray(new["w"])) <= 0.25), new


def test_p_scale_acts_at_init_only_as_documented():
  assert "p_scale`` only acts at ``init``" in madam_optax.madam.__doc__
  assert "``p_scale`` is read at ``init`` only" in (
    madam_optax.log_quantise.__doc__
  )
  params = {"w": jnp.array([1.0, -1.0])}
  tx = optax.inject_hyperparams(madam_optax.clip_weight_magnitude)(p_scale=1.0)
  state = tx.init(params)
  state.hyperparams["p_scale"] = jnp.float32(0.5)
  new, _, _ = _step(tx, {"w": jnp.array([0.5, -0.5])}, params, state)
  np.testing.assert_array_equal(new["w"], [1.0, -1.0])  # the init bound


def test_documented_limits_of_tiny_and_low_precision_weights():
  """The limits the docstring states hold, and are stated."""
  doc = madam_optax.multiplicative_step.__doc__
  assert "1e-36" in doc and "bfloat16" in doc and "2**-9" in doc
  tx = madam_optax.multiplicative_step(0.01)
  tiny = {"w": jnp.array([1e-37, 1e-35], jnp.float32)}
  new, _, _ = _step(tx, {"w": jnp.ones(2)}, tiny, jit=True)
  assert new["w"][0] == tiny["w"][0] and new["w"][1] != tiny["w"][1]
  half = {"w": jnp.array([1.0], jnp.bfloat16)}
  for lr, moves in ((0.001, False), (0.01, True)):
    tx = madam_optax.multiplicative_step(lr)
    new, _, _ = _step(tx, {"w": jnp.ones(1, jnp.bfloat16)}, half, jit=True)
    assert bool(new["w"][0] != half["w"][0]) == moves, lr


# Found by the fuzz harness (tests/test_fuzz.py).


@pytest.mark.parametrize("jit", [False, True])
def test_a_bfloat16_weight_far_above_its_bound_is_not_zeroed(jit):
  # |w| / bound = 1000 > 2**8: no w + delta in bfloat16 lands in the bound
  # but 0, from which the weight could never move again.
  params = {"w": jnp.array([0.0015335, 1.0], jnp.bfloat16)}
  tx = madam_optax.clip_weight_magnitude(max_magnitude=1.5e-6)
  state = tx.init(params)
  new, _, state = _step(
    tx, {"w": jnp.zeros(2, jnp.bfloat16)}, params, state, jit=jit
  )
  assert np.all(np.asarray(new["w"], np.float32) > 0), new
  # One ulp of w from zero (|w| / 2**7 or less) at each step, then in the
  # bound: after one step for the first entry, three for the second.
  for steps in range(3):
    new, _, _ = _step(
      tx, {"w": jnp.zeros(2, jnp.bfloat16)}, new, state, jit=jit
    )
    w = np.asarray(new["w"], np.float32)
    assert np.all(w > 0) and w[0] <= 1.5e-6, new
  assert w[1] <= 1.5e-6, new


@pytest.mark.parametrize("jit", [False, True])
def test_a_weight_far_above_the_grid_is_not_zeroed(jit):
  fmt = LNSFormat.spanning(1000, 0.5)
  tx = madam_optax.log_quantise(fmt, max_magnitude=1000.0)
  params = {"w": jnp.array([1e11, -1e11, 2.0])}  # ulp(1e11) = 8192
  state = tx.init(params)
  new, _, state = _step(tx, {"w": jnp.zeros(3)}, params, state, jit=jit)
  np.testing.assert_array_equal(np.sign(new["w"]), [1, -1, 1])
  again, _, _ = _step(tx, {"w": jnp.zeros(3)}, new, state, jit=jit)
  np.testing.assert_allclose(again["w"][:2], [1000.0, -1000.0])


def test_the_bound_in_bfloat16_is_rounded_down():
  # 2.96527312e16 rounds up to 2.9695610e16 in bfloat16.
  bound = 2.96527312e16
  params = {"w": jnp.array([1.0, -1.0], jnp.bfloat16)}
  tx = madam_optax.clip_weight_magnitude(max_magnitude=bound)
  new, _, _ = _step(
    tx, {"w": jnp.array([1e17, -1e17], jnp.bfloat16)}, params, jit=True
  )
  assert np.all(np.abs(np.asarray(new["w"], np.float64)) <= bound), new


def test_a_nan_gradient_gives_a_nan_update_under_jit_too():
  # XLA's max/min may drop a NaN under jit: the update was silently 0.
  tx = madam_optax.scale_by_second_moment()
  g = {"w": jnp.array([np.nan, 1.0])}
  for update in (tx.update, jax.jit(tx.update)):
    u, _ = update(g, tx.init(g))
    assert np.isnan(u["w"][0]) and u["w"][1] == 1.0


def test_lns_encode_checks_p_scale_under_jit():
  encode = jax.jit(lambda w: madam_optax.lns_encode(w, FMT, p_scale=-1.0))
  with pytest.raises(ValueError, match="p_scale must be > 0"):
    encode(jnp.ones(3))


def test_integer_leaves_are_never_given_to_the_additive_optimizer():
  # Its float updates would be truncated to integers by apply_updates.
  codes = {"w": jnp.zeros(3, jnp.int8), "v": jnp.array([5], jnp.int8)}
  labels = madam_optax.multiplicative_labels(codes, min_ndim=2)
  assert labels == {"w": "multiplicative", "v": "multiplicative"}


def test_state_dtype_under_inject_hyperparams():
  # inject_hyperparams calls the dtype (it is callable) like a schedule.
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optax.inject_hyperparams(madam_optax.madam)(state_dtype=jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    state = tx.init(params)
    _step(tx, {"w": jnp.ones(2)}, params, state)
  assert state.inner_state[0].rms_hat["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("jit", [False, True])
def test_a_zero_weight_stays_zero_under_a_huge_step(jit):
  # -lr * u overflowed to inf, and inf * sign(0) made the zero weight NaN.
  tx = madam_optax.multiplicative_step(10.0)
  params = {"w": jnp.array([0.0, 1.0, -1.0])}
  new, _, _ = _step(
    tx, {"w": jnp.array([8.5e37, 8.5e37, -8.5e37])}, params, jit=jit
  )
  np.testing.assert_array_equal(new["w"], [0.0, 0.0, 0.0])  # 1 * e**-inf


@pytest.mark.parametrize(
  "factory",
  [
    madam_optax.scale_by_second_moment,
    madam_optax.scale_by_factored_second_moment,
    madam_optax.madam,
  ],
)
def test_a_state_dtype_narrower_than_a_leaf_is_refused(factory):
  # float64 gradients of 1e300 gave an inf statistic in bfloat16 and from
  # then on silent zero updates; float16 holds no float32 gradient > 65504.
  with jax.enable_x64(True):
    tx = factory(state_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"float64 leaf \['w'\].*narrower"):
      tx.init({"b": jnp.ones(3, jnp.float32), "w": jnp.ones(3, jnp.float64)})
  tx = factory(state_dtype=jnp.float16)
  with pytest.raises(ValueError, match=r"float32 leaf \['w'\]"):
    tx.init({"w": jnp.ones(3)})
  # bfloat16 has float32's range: allowed for float32 and float16 leaves.
  tx = factory(state_dtype=jnp.bfloat16)
  tx.init({"w": jnp.ones(3), "h": jnp.ones(3, jnp.float16)})


@pytest.mark.parametrize(
  "factory",
  [
    madam_optax.scale_by_second_moment,
    madam_optax.scale_by_factored_second_moment,
  ],
)
@pytest.mark.parametrize("python_scalar", [False, True])
def test_apply_if_finite_run_eagerly_normalises_huge_gradients(
  factory, python_scalar
):
  # Eagerly, the guard's lax.cond closed over the gradients: they became
  # constants, and XLA's constant folding of the normaliser's hypot gave a
  # NaN statistic and a zero update for a gradient of 3.65e32.
  tx = madam_optax.apply_if_finite(factory(b2=0.5), max_consecutive_errors=3)
  g = 3.65e32 if python_scalar else jnp.array([3.65e32, -1.0])
  params = {"w": 1.0 if python_scalar else jnp.ones(2)}
  state = tx.init(params)
  u, state = tx.update({"w": g}, state, params)
  np.testing.assert_array_equal(u["w"], np.sign(g))
  chex.assert_tree_all_finite(state.inner_state)
