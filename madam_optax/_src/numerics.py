"""Low-level float helpers in ``lax`` primitives: compute dtype, hypot, ulps.

The per-leaf maths is written with ``lax`` rather than ``jnp``: each ``jnp``
wrapper adds a nested jit to the traced program, which multiplies tracing and
compile time on trees with hundreds of leaves.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype the maths runs in: at least float32, higher if the input is."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def unit_scale(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(2**-e, 2**e)``, taking ``max(|x|, |y|)`` into ``[1, 2)`` and back.

  Element-wise, for same-shape float32/float64 arrays, built from the
  exponent bits of the larger magnitude (a few integer operations, no
  division). Multiplying by either only changes exponents, so it is exact
  unless the product leaves the normal range. The exponent is capped so
  that ``2**-e`` stays normal: magnitudes in the top binade land in
  ``[2, 4)``. Where both are 0 (or subnormal), ``2**e`` is 0.
  """
  dtype = np.dtype(x.dtype)
  info = np.finfo(dtype)
  int_dtype = np.dtype(f"int{8 * dtype.itemsize}")
  mant = info.nmant  # 23 (float32) or 52 (float64)
  bias = info.maxexp - 1  # 127 or 1023
  # The bits of a non-negative float order like the float (NaN above inf).
  top = lax.max(
    lax.bitcast_convert_type(lax.abs(x), int_dtype),
    lax.bitcast_convert_type(lax.abs(y), int_dtype),
  )
  # Biased exponent field of max(|x|, |y|), at most 2 * bias - 1 so that the
  # scale 2**(bias - field) stays a normal number.
  field = lax.min(
    lax.bitwise_and(
      top, np.asarray(((1 << (info.nexp)) - 1) << mant, int_dtype)
    ),
    np.asarray((2 * bias - 1) << mant, int_dtype),
  )
  scale = lax.bitcast_convert_type(
    lax.sub(np.asarray((2 * bias) << mant, int_dtype), field), dtype
  )
  return scale, lax.bitcast_convert_type(field, dtype)


def hypot(
  x: jax.Array, y: jax.Array, a: Any = None, b: Any = None
) -> jax.Array:
  """``sqrt((a x)**2 + (b y)**2)`` of same-shape float32/float64 arrays.

  ``a`` and ``b`` are optional weights with ``a**2 + b**2 <= 1`` (scalars
  of the arrays' dtype; omitted, 1), applied *after* the scaling below, so
  that a weighted term neither overflows nor underflows before it is
  squared: with ``|x|, |y|`` ~ 1e-37 and ``b = sqrt(1 - 0.999)``, ``b y``
  alone is a float32 subnormal, which XLA flushes to zero, but the weighted
  root is normal and is returned as such. With weights the result is a
  weighted root mean square, at most ``max(|x|, |y|)`` in exact arithmetic;
  rounded, it can exceed it by an ulp, which at float32's largest value is
  ``inf``: callers that store it hold it within range.

  Both are scaled by the power of two ``2**-e`` that brings the larger
  magnitude into ``[1, 2)`` (:func:`unit_scale`, exact), squared and
  summed there, and the root is scaled back by ``2**e``. This costs one
  square root and no division, unlike ``jnp.hypot``'s
  ``m * sqrt(1 + (n / m)**2)``. With ``y == 0`` it returns ``|x|`` exactly
  (``sqrt(fl(a * a)) == |a|`` in binary floating point); 0 at 0, ``inf`` at
  ``inf``, NaN at NaN. A smaller square that underflows in the scaled range
  is below the larger one's rounding error.
  """
  x, y = lax.abs(x), lax.abs(y)
  scale, unscale = unit_scale(x, y)
  xs, ys = lax.mul(x, scale), lax.mul(y, scale)
  if a is not None:
    xs = lax.mul(xs, lax.convert_element_type(a, x.dtype))
  if b is not None:
    ys = lax.mul(ys, lax.convert_element_type(b, x.dtype))
  return lax.mul(lax.sqrt(lax.add(lax.mul(xs, xs), lax.mul(ys, ys))), unscale)


def to_state_dtype(x: jax.Array, dtype: Any) -> jax.Array:
  """``x`` converted to a state's ``dtype``, saturating at its largest value.

  A narrower state (bfloat16, whose largest value, 3.39e38, is below
  float32's 3.40e38) would otherwise hold ``inf`` for a statistic of
  float32's largest gradients, and every later update would be 0. Two
  selects, so a NaN stays NaN; nothing changes when ``dtype`` is ``x``'s.
  """
  if np.dtype(dtype) == np.dtype(x.dtype):
    return x
  top = np.asarray(np.finfo(dtype).max, x.dtype)
  x = lax.select(lax.gt(x, top), lax.full_like(x, top), x)
  x = lax.select(lax.lt(x, -top), lax.full_like(x, -top), x)
  return lax.convert_element_type(x, dtype)


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
  grows = lax.ne(
    lax.ge(bits, np.asarray(0, int_dtype)),
    lax.ge(reference, np.asarray(0, reference.dtype)),
  )
  step = lax.sub(
    lax.mul(
      lax.convert_element_type(grows, int_dtype), np.asarray(2, int_dtype)
    ),
    one,
  )  # +1 or -1
  return lax.bitcast_convert_type(lax.add(bits, step), x.dtype)


def _opposite_signs_or_one(x_bits: jax.Array, y_bits: jax.Array) -> jax.Array:
  """-1 where the sign bits of two bit patterns differ, +1 where they agree.

  An arithmetic right shift of ``x ^ y`` by all but one bit gives -1 or 0;
  or-ing 1 makes it -1 or +1 (three integer operations).
  """
  width = np.iinfo(x_bits.dtype).bits
  return lax.bitwise_or(
    lax.shift_right_arithmetic(
      lax.bitwise_xor(x_bits, y_bits), np.asarray(width - 1, x_bits.dtype)
    ),
    np.asarray(1, x_bits.dtype),
  )


def land_on_the_side_of(
  w: jax.Array, delta: jax.Array, target: jax.Array
) -> jax.Array:
  """``delta``, unless ``w + delta`` loses the sign of a nonzero ``target``.

  A transform that returns ``target - w`` for ``optax.apply_updates`` to add
  cannot reach a ``target`` smaller than an ulp of ``w``: ``w + delta`` then
  rounds to 0 (a weight that could never move again) or past it. In that
  case the update lands on ``sign(target)`` times one ulp of ``w`` instead,
  the value of that sign closest to zero that ``w + delta`` reaches (at
  most ``eps * |w|``), from which later steps reach ``target``. A NaN
  ``target`` keeps ``delta`` (a NaN step stays visible). All arrays share
  ``w``'s dtype.
  """
  dtype = np.dtype(w.dtype)
  int_dtype = np.dtype(f"int{8 * dtype.itemsize}")
  zero = np.asarray(0, dtype)
  landed = lax.add(w, delta)
  # Lost: target > 0 but not landed > 0, or target < 0 but not landed < 0
  # (compares only: a zero, NaN or wrong-signed landing is lost; a zero or
  # NaN target is never lost).
  lost = lax.bitwise_or(
    lax.bitwise_and(
      lax.gt(target, zero), lax.bitwise_not(lax.gt(landed, zero))
    ),
    lax.bitwise_and(
      lax.lt(target, zero), lax.bitwise_not(lax.lt(landed, zero))
    ),
  )
  lost = lax.bitwise_and(lost, lax.ne(w, lax.full_like(w, 0)))
  # -w one ulp further from zero where w and target have opposite signs,
  # nearer to it where they agree: then w + that = sign(target) ulp.
  w_bits = lax.bitcast_convert_type(w, int_dtype)
  minus_w = lax.bitwise_xor(
    w_bits, np.asarray(np.iinfo(int_dtype).min, int_dtype)
  )
  one_ulp = lax.sub(
    minus_w,
    _opposite_signs_or_one(w_bits, lax.bitcast_convert_type(target, int_dtype)),
  )
  return lax.select(lost, lax.bitcast_convert_type(one_ulp, dtype), delta)


def update_reaching(w: jax.Array, target: jax.Array) -> jax.Array:
  """The update ``delta`` for which ``w + delta`` lands on ``target``.

  ``optax.apply_updates`` adds ``delta`` to ``w`` in ``w``'s dtype, and
  ``target - w`` is itself rounded: when ``w`` and ``target`` are more than a
  factor of two apart, ``w + (target - w)`` can land one ulp beyond
  ``target`` (past a magnitude bound, or to ``inf`` when ``target`` is the
  dtype's largest value). ``delta`` is then moved one ulp so that
  ``|w + delta| <= |target|``; and when ``target`` lies below an ulp of
  ``w``, ``w + delta`` lands on ``target``'s side of zero
  (:func:`land_on_the_side_of`) rather than on zero. All arrays share
  ``w``'s dtype. The one-ulp moves are integer operations on the bit
  patterns (floats are sign and magnitude).
  """
  int_dtype = np.dtype(f"int{8 * np.dtype(w.dtype).itemsize}")
  delta = lax.sub(target, w)
  realised = lax.add(w, delta)
  over = lax.gt(lax.abs(realised), lax.abs(target))
  # Where over, realised is nonzero and not NaN: delta grows by one ulp
  # (+1 on its bits) when its sign differs from realised's, else shrinks.
  delta_bits = lax.bitcast_convert_type(delta, int_dtype)
  nudged = lax.sub(
    delta_bits,
    _opposite_signs_or_one(
      delta_bits, lax.bitcast_convert_type(realised, int_dtype)
    ),
  )
  delta = lax.select(over, lax.bitcast_convert_type(nudged, w.dtype), delta)
  return land_on_the_side_of(w, delta, target)


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


# expm1 in float32 at about the cost of exp (XLA:CPU's own expm1 costs about
# three exps). x = k ln 2 + r with |r| <= ln(2) / 2 (Cody-Waite: ln 2 in two
# parts, the first exact in float32 with 9 trailing zero bits), and
# expm1(r) = r + r**2 (1/2! + r/3! + ... + r**5/7!), whose truncation error
# is below 2e-8 relative for |r| <= ln(2) / 2.
_LOG2_E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286067653302226e-06
_EXPM1_QUOTIENT = tuple(1.0 / math.factorial(n) for n in range(7, 1, -1))
# Beyond this |x| the reduction is needed: round(x / ln 2) != 0.
REDUCTION_FREE_EXPM1 = 0.34


def expm1(x: jax.Array, max_abs: float | None = None) -> jax.Array:
  r"""``exp(x) - 1`` of a float array, accurate near 0, cheap in float32.

  Float32 input gets a polynomial with a Cody-Waite range reduction (within
  0.6 ulp for :math:`|x| \le 0.1`, 1.7 ulp anywhere; ``inf``, ``-1`` and NaN
  at the ends); other dtypes use ``lax.expm1``. ``max_abs`` is a bound on
  :math:`|x|` known at trace time: at most :data:`REDUCTION_FREE_EXPM1` it
  skips the reduction, which only ever applies to larger :math:`|x|`, so the
  result is bit for bit the same.
  """
  if np.dtype(x.dtype) != np.float32:
    return lax.expm1(x)
  f32 = np.float32
  reduce = max_abs is None or max_abs > REDUCTION_FREE_EXPM1
  if reduce:
    x = lax.clamp(f32(-104.0), x, f32(89.0))
    k = lax.round(lax.mul(x, f32(_LOG2_E)), lax.RoundingMethod.TO_NEAREST_EVEN)
    r = lax.sub(lax.sub(x, lax.mul(k, f32(_LN2_HI))), lax.mul(k, f32(_LN2_LO)))
  else:
    r = x
  q = f32(_EXPM1_QUOTIENT[0])
  for c in _EXPM1_QUOTIENT[1:]:
    q = lax.add(lax.mul(q, r), f32(c))
  p = lax.add(lax.mul(lax.mul(r, r), q), r)  # expm1(r)
  if not reduce:
    return p
  # 2**k (1 + p) - 1 = 2**k p + (2**k - 1), rounded once; 2**k is built from
  # its exponent bits (k = -127 gives 0, so the result is -1), and k = 128 as
  # 2 * 2**127.
  ki = lax.convert_element_type(lax.clamp(f32(-127.0), k, f32(127.0)), np.int32)
  two_k = lax.bitcast_convert_type(
    lax.shift_left(lax.add(ki, np.int32(127)), np.int32(23)), np.float32
  )
  big = lax.add(lax.mul(p, two_k), lax.sub(two_k, f32(1.0)))
  big = lax.select(lax.gt(k, f32(127.0)), lax.mul(big, f32(2.0)), big)
  return lax.select(lax.eq(k, f32(0.0)), p, big)


def with_sign_of(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x`` with its sign flipped where ``w``'s sign bit is set (same dtype).

  Equals ``x * sign(w)`` wherever ``w`` is nonzero: two integer operations
  instead of ``sign``'s compares and selects.
  """
  int_dtype = np.dtype(f"int{8 * np.dtype(x.dtype).itemsize}")
  sign_bit = np.asarray(np.iinfo(int_dtype).min, int_dtype)
  flipped = lax.bitwise_xor(
    lax.bitcast_convert_type(x, int_dtype),
    lax.bitwise_and(lax.bitcast_convert_type(w, int_dtype), sign_bit),
  )
  return lax.bitcast_convert_type(flipped, x.dtype)


def grow_by_one_ulp(x: jax.Array) -> jax.Array:
  """``x`` one ulp further from zero (finite nonzero ``x``; either sign).

  Floats are sign and magnitude, so adding one to the bit pattern, read as a
  signed integer, grows ``|x|`` for both signs.
  """
  int_dtype = np.dtype(f"int{8 * np.dtype(x.dtype).itemsize}")
  return lax.bitcast_convert_type(
    lax.add(lax.bitcast_convert_type(x, int_dtype), np.asarray(1, int_dtype)),
    x.dtype,
  )


def small_integer_to_int32(x: jax.Array) -> jax.Array:
  """Integer-valued float32 ``x`` with ``|x| < 2**22`` as int32, exactly.

  Adding ``1.5 * 2**23`` puts the integer in the low mantissa bits (exact in
  that range), which are then read off the bit pattern: two operations
  instead of a saturating conversion's six.
  """
  magic = np.float32(1.5 * 2.0**23)
  bits = lax.bitcast_convert_type(lax.add(x, magic), np.int32)
  return lax.sub(bits, lax.bitcast_convert_type(magic, np.int32))
