"""The public API: curated names, keyword-only arguments, deprecated aliases.

Also the consolidation's regressions that are about the API's shape: the
one ``w_max`` function, ``LNSFormat`` as a static value, modules not shadowed
by the functions they define.
"""

import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax import LNSFormat


def test_all_is_exactly_the_public_names():
  public = {n for n in dir(madam_optax) if not n.startswith("_")}
  assert set(madam_optax.__all__) == public
  assert list(madam_optax.__all__) == sorted(madam_optax.__all__)


def test_implementation_modules_are_private():
  """Modules live under ``_src``: ``import madam_optax.lns_madam`` no longer
  yields a function shadowing a module of the same name."""
  names = [m.name for m in pkgutil.iter_modules(madam_optax.__path__)]
  assert names == ["_src"]
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module("madam_optax.lns_madam")
  assert callable(madam_optax.lns_madam)


@pytest.mark.parametrize(
  "factory, first",
  [
    (madam_optax.madam, "learning_rate"),
    (madam_optax.lns_madam, "learning_rate"),
    (madam_optax.lns_level_step, "learning_rate"),
    (madam_optax.multiplicative_step, "learning_rate"),
    (madam_optax.scale_by_second_moment, "b2"),
    (madam_optax.clip_weight_magnitude, "p_scale"),
    (madam_optax.log_quantise, "fmt"),
  ],
)
def test_everything_after_the_first_hyperparameter_is_keyword_only(
  factory, first
):
  params = list(inspect.signature(factory).parameters.values())
  names = [p.name for p in params]
  after = params[names.index(first) + 1 :]
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in after), names


def test_positional_p_scale_is_refused():
  with pytest.raises(TypeError):
    madam_optax.madam(0.01, 3.0)  # pylint: disable=too-many-function-args


def test_every_factory_returns_extra_args_transforms():
  fmt = LNSFormat.spanning(127)
  for tx in (
    madam_optax.madam(),
    madam_optax.lns_madam(fmt),
    madam_optax.lns_madam_reference(),
    madam_optax.lns_level_step(fmt),
    madam_optax.log_quantise(fmt),
    madam_optax.scale_by_second_moment(),
    madam_optax.multiplicative_step(),
    madam_optax.clip_weight_magnitude(),
  ):
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_log_quantise_and_level_step_accept_extra_kwargs():
  """Optax's chain forwards keyword arguments; these used to raise TypeError."""
  fmt = LNSFormat.spanning(127)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  tx = madam_optax.log_quantise(fmt)
  tx.update(params, tx.init(params), params, loss=jnp.float32(1.0))
  codes, _ = madam_optax.lns_encode_tree(params, fmt)
  tx = madam_optax.lns_madam(fmt)
  tx.update(params, tx.init(codes), codes, loss=jnp.float32(1.0))


# --- the one w_max function -------------------------------------------------


def _reference_w_max(w, p_scale=3.0):
  w = np.asarray(w, np.float64)
  return p_scale * np.sqrt(np.mean(np.square(w)))


@pytest.mark.parametrize(
  "magnitude", [1e-30, 1e-20, 1.0, 1e20, 1e30, 8.6e37, 3e38]
)
def test_initial_max_magnitude_float32_extremes(magnitude):
  w = np.array([1.0, -0.5, 0.25, -0.125], np.float32) * np.float32(magnitude)
  got = float(madam_optax.initial_max_magnitude(jnp.asarray(w)))
  want = min(_reference_w_max(w), float(np.finfo(np.float32).max))
  assert got == pytest.approx(want, rel=1e-6)
  assert got > 0


def test_initial_max_magnitude_float16_is_capped_at_its_max():
  w = jnp.array([60000.0, -60000.0], jnp.float16)
  got = madam_optax.initial_max_magnitude(w)
  assert got.dtype == jnp.float32
  assert float(got) == float(np.finfo(np.float16).max)


def test_initial_max_magnitude_zero_and_empty():
  assert float(madam_optax.initial_max_magnitude(jnp.zeros(3))) == 0.0
  assert float(madam_optax.initial_max_magnitude(jnp.zeros((0, 3)))) == 0.0


def test_initial_max_magnitude_on_a_tree_keeps_structure():
  tree = {"a": jnp.ones((2, 2)), "b": (jnp.full(3, 2.0),), "c": None}
  got = madam_optax.initial_max_magnitude(tree, 1.0)
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  assert float(got["b"][0]) == 2.0


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_lns_encode_handles_extreme_tensors(magnitude):
  """lns_scale squared the weights: RMS 1e-30 or 1e30 gave 'all-zero?'."""
  fmt = LNSFormat.spanning(127)
  w = jnp.array([1.0, -0.5, 0.25], jnp.float32) * magnitude
  codes, w_max = madam_optax.lns_encode(w, fmt)
  assert float(w_max) == pytest.approx(
    _reference_w_max(np.asarray(w)), rel=1e-6
  )
  back = madam_optax.lns_decode(codes, w_max, fmt)
  np.testing.assert_allclose(back, w, rtol=fmt.base - 1)


def test_lns_encode_float16_scale_within_float16():
  fmt = LNSFormat.spanning(127)
  _, w_max = madam_optax.lns_encode(
    jnp.array([60000.0, -1.0], jnp.float16), fmt
  )
  assert float(w_max) <= float(np.finfo(np.float16).max)


def test_lns_scale_is_the_same_number_as_the_bound():
  w = jnp.array([[0.3, -1.2], [2.0, 0.01]])
  bound = madam_optax.initial_max_magnitude(w, 2.0)
  state = madam_optax.clip_weight_magnitude(2.0).init(w)
  assert float(state.max_magnitude) == float(bound)
  _, w_max = madam_optax.lns_encode(w, LNSFormat.spanning(127), p_scale=2.0)
  assert float(w_max) == float(bound)


# --- deprecated aliases (one release) ----------------------------------------


def test_deprecated_aliases_warn_and_agree():
  w = jnp.array([0.3, -1.2, 2.0])
  want = float(madam_optax.initial_max_magnitude(w, 2.0))
  with pytest.warns(DeprecationWarning, match="initial_max_magnitude"):
    assert float(madam_optax.initial_rms_bound(w, 2.0)) == want
  with pytest.warns(DeprecationWarning, match="initial_max_magnitude"):
    assert float(madam_optax.lns_scale(w, 2.0)) == want
  fmt = LNSFormat.spanning(127)
  with pytest.warns(DeprecationWarning, match="max_magnitude"):
    codes, _ = madam_optax.lns_encode(w, fmt, scale=1.0)
  with pytest.warns(DeprecationWarning, match="max_magnitude"):
    old = madam_optax.lns_decode(codes, scale=1.0, fmt=fmt)
  np.testing.assert_array_equal(old, madam_optax.lns_decode(codes, 1.0, fmt))


# --- LNSFormat as a value ----------------------------------------------------


def test_lns_format_is_frozen_and_hashable():
  a, b = LNSFormat(127, 1.03), LNSFormat(127, 1.03)
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  with pytest.raises(Exception):  # dataclasses.FrozenInstanceError
    a.levels = 3  # type: ignore[misc]


def test_lns_format_as_jit_argument_static_or_not():
  """``jax.jit(f)(codes, fmt)`` failed deep inside with 'levels must be a
  Python int, got JitTracer'."""
  fmt = LNSFormat(8, 2.0)
  codes = jnp.array([8, -7, 6, 0], jnp.int8)
  want = madam_optax.lns_decode(codes, 1.0, fmt)
  decode = lambda c, f: madam_optax.lns_decode(c, 1.0, f)
  np.testing.assert_array_equal(jax.jit(decode)(codes, fmt), want)
  np.testing.assert_array_equal(
    jax.jit(decode, static_argnums=1)(codes, fmt), want
  )
  assert jax.tree.leaves(fmt) == []


@pytest.mark.parametrize(
  "levels, base",
  [
    (1, 2.0),
    (40000, 2.0),
    (8, 1.0),
    (8, float("nan")),
    (8.0, 2.0),
    (True, 2.0),
  ],
)
def test_invalid_format_refused_when_built(levels, base):
  with pytest.raises(ValueError, match="LNSFormat"):
    LNSFormat(levels, base)
