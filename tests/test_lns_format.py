"""Tests of the LNS integer format (madam_optax.lns_format)."""

import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import madam_optax
from madam_optax import LNSFormat


@pytest.mark.parametrize("levels, dtype", [
    (2, np.int8), (127, np.int8), (128, np.int16), (4096, np.int16),
    (32767, np.int16)])
def test_storage_dtype(levels, dtype):
  fmt = LNSFormat.spanning(levels)
  assert fmt.dtype == np.dtype(dtype)
  codes, _ = madam_optax.lns_encode(jnp.linspace(-1.0, 1.0, 11), fmt)
  assert codes.dtype == np.dtype(dtype)


@given(levels=st.integers(2, 5000),
       log_range=st.floats(0.5, 12.0),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_within_half_a_level(levels, log_range, seed):
  fmt = LNSFormat.spanning(levels, log_range)
  rng = np.random.default_rng(seed)
  scale = 2.0
  # magnitudes inside the grid's range, both signs
  log_mag = rng.uniform(-log_range, 0.0, 300)
  w = (rng.choice([-1.0, 1.0], 300) * scale * np.exp(log_mag)).astype(np.float32)
  codes, s = madam_optax.lns_encode(jnp.asarray(w), fmt, scale=scale)
  back = np.asarray(madam_optax.lns_decode(codes, s, fmt))
  np.testing.assert_array_equal(np.sign(back), np.sign(w))
  err = np.abs(np.log(np.abs(back)) - np.log(np.abs(w)))
  assert err.max() <= fmt.log_base / 2 + 1e-5
  c = np.asarray(codes).astype(np.int64)
  assert np.all((np.abs(c) >= 1) & (np.abs(c) <= levels))


def test_range_clamps_and_zero():
  fmt = LNSFormat(levels=10, base=2.0)
  w = jnp.array([5.0, -5.0, 1e-9, -1e-9, 0.0, 1.0])
  codes, _ = madam_optax.lns_encode(w, fmt, scale=1.0)
  chex.assert_trees_all_equal(codes, jnp.array([10, -10, 1, -1, 0, 10],
                                               jnp.int8))
  back = madam_optax.lns_decode(codes, 1.0, fmt)
  np.testing.assert_allclose(back, [1, -1, 2.0**-9, -(2.0**-9), 0, 1])


@pytest.mark.parametrize("levels", [127, 4096])
def test_every_code_decodes_and_reencodes_to_itself(levels):
  fmt = LNSFormat.spanning(levels)
  codes = jnp.arange(-levels, levels + 1).astype(fmt.dtype)
  w = madam_optax.lns_decode(codes, 0.7, fmt)
  again, _ = madam_optax.lns_encode(w, fmt, scale=0.7)
  chex.assert_trees_all_equal(again, codes)
  assert np.all(np.diff(np.asarray(w)) > 0)     # codes are ordered like weights


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
  params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5]]), "b": jnp.zeros(2),
            "s": jnp.ones(3)}
  codes, scales = madam_optax.lns_encode_tree(params, fmt, min_ndim=2)
  assert codes["w"].dtype == jnp.int8
  assert codes["b"] is params["b"] and codes["s"] is params["s"]
  assert scales["b"] is None and scales["s"] is None
  back = madam_optax.lns_decode_tree(codes, scales, fmt)
  np.testing.assert_allclose(back["w"], params["w"], rtol=fmt.log_base)
  chex.assert_trees_all_equal(back["b"], params["b"])


@pytest.mark.parametrize("w", [jnp.array([1, 2]), np.array([1, 2], np.int8),
                               jnp.array([True])])
def test_encode_rejects_non_float(w):
  with pytest.raises(ValueError, match="floating-point weights"):
    madam_optax.lns_encode(w, LNSFormat.spanning(16))


def test_encode_tree_rejects_non_float():
  with pytest.raises(ValueError, match=r"\['w'\].*int32"):
    madam_optax.lns_encode_tree({"w": jnp.array([1, 2])}, LNSFormat.spanning(16))


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
    madam_optax.lns_encode(jnp.ones(3), fmt, max_magnitude=0.0)


def test_decode_rejects_float_codes():
  with pytest.raises(ValueError, match="integer codes"):
    madam_optax.lns_decode(jnp.ones(2), 1.0, LNSFormat.spanning(16))


def test_readme_lns_example_runs():
  """The code block of the README's LNS section, on a small regression."""
  import pathlib  # pylint: disable=import-outside-toplevel
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = readme.split("<!-- section:lns -->", 1)[1]
  section = section.split("<!-- section:", 1)[0]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.zeros(3)}
  batch = jnp.ones((2, 4))
  namespace = {"params": params, "batch": batch,
               "loss_fn": lambda p, x: jnp.sum((x @ p["w"] + p["b"]) ** 2)}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["codes"]["w"].dtype == jnp.int8
  assert namespace["codes"]["b"].dtype == jnp.float32
  assert namespace["loss"] > 0
