"""Whole trees of LNS codes: the dtypes of decoding and of the gradients.

Float64 weights round-trip in float64 through ``lns_encode_tree``,
``lns_decode_tree`` and ``lns_value_and_grad``; ``compute_dtype`` decodes
to (and differentiates in) a narrower float such as bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)


def _tiny_float64_params():
  w = np.array([[1e-303, -2.5e-303], [4e-303, -1e-303]], np.float64)
  return {"w": jnp.asarray(w), "b": jnp.zeros(2, jnp.float64)}


def test_float64_weights_decode_in_float64():
  with jax.enable_x64(True):
    params = _tiny_float64_params()
    codes, w_max = madam_optax.lns_encode_tree(params, INT8)
    assert w_max["w"].dtype == jnp.float64
    back = madam_optax.lns_decode_tree(codes, w_max, INT8)
    assert back["w"].dtype == jnp.float64 and back["b"].dtype == jnp.float64
    # Within half a level of the weights, none flushed to zero.
    ratio = np.asarray(back["w"]) / np.asarray(params["w"])
    half_level = np.sqrt(INT8.base) * (1 + 1e-12)
    assert np.all((ratio > 1 / half_level) & (ratio < half_level)), ratio


def test_float64_value_and_grad_is_float64():
  with jax.enable_x64(True):
    params = _tiny_float64_params()
    codes, w_max = madam_optax.lns_encode_tree(params, INT8)
    x = jnp.array([1.0, 2.0], jnp.float64)

    def loss(p, x):
      return jnp.sum((p["w"] @ x) * 1e303) + jnp.sum(p["b"] ** 2)

    value, grads = madam_optax.lns_value_and_grad(loss, w_max, INT8)(codes, x)
    assert value.dtype == jnp.float64
    assert grads["w"].dtype == jnp.float64 and grads["b"].dtype == jnp.float64
    expected = loss(madam_optax.lns_decode_tree(codes, w_max, INT8), x)
    assert float(value) == float(expected) != 0.0
    np.testing.assert_array_equal(grads["w"], 1e303 * np.ones((2, 1)) * x)


def test_float32_weights_still_decode_in_float32():
  params = {"w": jnp.array([[0.5, -1.0]]), "b": jnp.zeros(2)}
  codes, w_max = madam_optax.lns_encode_tree(params, INT8)
  assert madam_optax.lns_decode_tree(codes, w_max, INT8)["w"].dtype == (
    jnp.float32
  )
  # A Python number as the scale decodes to float32, as before.
  w = madam_optax.lns_decode_tree({"w": codes["w"]}, {"w": 1.0}, INT8)["w"]
  assert w.dtype == jnp.float32


def test_bfloat16_compute_dtype():
  params = {
    "w": jax.random.normal(jax.random.key(0), (16, 8)),
    "b": jnp.zeros(8),
  }
  codes, w_max = madam_optax.lns_encode_tree(params, INT8)
  x = jax.random.normal(jax.random.key(1), (4, 16))

  def loss(p, x):
    return jnp.mean((x @ p["w"] + p["b"]) ** 2)

  bf16 = madam_optax.lns_value_and_grad(
    loss, w_max, INT8, compute_dtype=jnp.bfloat16
  )
  value, grads = bf16(codes, x)
  assert grads["w"].dtype == jnp.bfloat16
  assert grads["b"].dtype == jnp.float32  # not encoded: kept as it is
  # The bfloat16 weights are the float32 decoding rounded once.
  w32 = madam_optax.lns_decode_tree(codes, w_max, INT8)
  w16 = madam_optax.lns_decode_tree(codes, w_max, INT8, jnp.bfloat16)
  np.testing.assert_array_equal(w16["w"], w32["w"].astype(jnp.bfloat16))
  value32, grads32 = madam_optax.lns_value_and_grad(loss, w_max, INT8)(codes, x)
  np.testing.assert_allclose(value, value32, rtol=2e-2)
  np.testing.assert_allclose(
    np.asarray(grads["w"], np.float32), grads32["w"], rtol=0.1, atol=0.02
  )
  # lns_madam takes the bfloat16 gradients: int8 codes come back.
  tx = madam_optax.with_additive_fallback(
    codes, madam_optax.lns_madam(INT8, factored=True), optax.adam(1e-3)
  )
  updates, _ = tx.update(grads, tx.init(codes), codes)
  assert optax.apply_updates(codes, updates)["w"].dtype == jnp.int8
