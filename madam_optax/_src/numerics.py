"""Low-level float helpers in ``lax`` primitives: compute dtype, hypot, ulps.

The per-leaf maths is written with ``lax`` rather than ``jnp``: each ``jnp``
wrapper adds a nested jit to the traced program, which multiplies tracing and
compile time on trees with hundreds of leaves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype the maths runs in: at least float32, higher if the input is."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def hypot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``jnp.hypot(x, y)`` for same-shape float arrays, in lax primitives.

  The same formula as ``jnp.hypot`` (``m * sqrt(1 + (n / m)**2)`` with
  ``m = max(|x|, |y|)``, ``n = min(|x|, |y|)``, 0 at 0 and inf at inf), with
  scalar constants only, which keeps tracing cheap on many-leaf trees.
  """
  x, y = lax.abs(x), lax.abs(y)
  big, small = lax.max(x, y), lax.min(x, y)
  # max(big, tiny) only differs from big at 0 (and in the subnormals, which
  # XLA flushes to zero), where small is 0 too and the result is 0 anyway.
  tiny = np.asarray(np.finfo(big.dtype).tiny, big.dtype)
  ratio = lax.div(small, lax.max(big, tiny))
  h = lax.mul(big, lax.sqrt(lax.add(np.asarray(1, big.dtype),
                                    lax.mul(ratio, ratio))))
  return lax.select(lax.eq(big, np.asarray(np.inf, big.dtype)), big, h)


def step_away_from(x: jax.Array, reference: jax.Array) -> jax.Array:
  """One ulp of ``x`` in the direction opposite to ``reference``'s sign.

  For finite nonzero ``x`` this is ``jnp.nextafter(x, -sign(reference) * inf)``,
  the only case in which it is used (a clipped step that overshot the bound
  is never zero or infinite). Floats are sign and magnitude, so adding one to
  the bit pattern grows ``|x|`` by one ulp and subtracting one shrinks it.
  """
  int_dtype = np.dtype(f"int{8 * np.dtype(x.dtype).itemsize}")
  one = np.asarray(1, int_dtype)
  bits = lax.bitcast_convert_type(x, int_dtype)
  # |x| grows when x and reference have opposite signs.
  grows = lax.ne(lax.ge(bits, np.asarray(0, int_dtype)),
                 lax.ge(reference, np.asarray(0, reference.dtype)))
  step = lax.sub(lax.mul(lax.convert_element_type(grows, int_dtype),
                         np.asarray(2, int_dtype)), one)      # +1 or -1
  return lax.bitcast_convert_type(lax.add(bits, step), x.dtype)


def land_on_the_side_of(w: jax.Array, delta: jax.Array,
                        target: jax.Array) -> jax.Array:
  """``delta``, unless ``w + delta`` loses the sign of a nonzero ``target``.

  A transform that returns ``target - w`` for ``optax.apply_updates`` to add
  cannot reach a ``target`` smaller than an ulp of ``w``: ``w + delta`` then
  rounds to 0 (a weight that could never move again) or past it. In that
  case the update lands on ``sign(target)`` times one ulp of ``w`` instead,
  the value of that sign closest to zero that ``w + delta`` reaches (at
  most ``eps * |w|``), from which later steps reach ``target``. All arrays
  share ``w``'s dtype.
  """
  landed = lax.add(w, delta)
  lost = lax.bitwise_and(
      lax.ne(target, lax.full_like(target, 0)),
      lax.ne(lax.sign(landed), lax.sign(target)))
  lost = lax.bitwise_and(lost, lax.ne(w, lax.full_like(w, 0)))
  # -w moved by one ulp against -target's sign: w + that = sign(target) ulp.
  one_ulp = step_away_from(lax.neg(w), lax.neg(target))
  return lax.select(lost, one_ulp, delta)


def _times_power_of_two(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` without forming an out-of-range power of two.

  The power is applied in two halves, each representable in ``x``'s dtype for
  any exponent of a finite float (float32: |exponent| <= 277).
  """
  half = exponent // 2
  return jnp.ldexp(jnp.ldexp(x, half), exponent - half)


def scaled_root_mean_square(x: jax.Array, factor: Any = 1.0) -> jax.Array:
  """``factor * sqrt(mean(x**2))`` of a float array, never over/underflowing.

  ``x`` is scaled by the power of two that brings ``max|x|`` into
  ``[0.5, 1)`` (exact), squared, averaged and multiplied by ``factor`` there,
  and scaled back; an empty or all-zero array gives 0. No reciprocal is
  formed, so magnitudes near the dtype's largest or smallest normal value are
  handled too; a result beyond the dtype's range is ``inf`` (or flushed to 0).
  """
  if x.size == 0:
    return jnp.zeros([], x.dtype)
  m = jnp.max(jnp.abs(x))
  _, e = jnp.frexp(m)
  scaled = _times_power_of_two(x, -e)
  rms = jnp.sqrt(jnp.mean(jnp.square(scaled)))
  return _times_power_of_two(jnp.asarray(factor, x.dtype) * rms, e)
