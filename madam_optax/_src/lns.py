"""The log-number-system (LNS) format: codes, levels, values, rounding, grid.

A weight is ``w = s * w_max * base**(-k)`` (the paper's LNS training and the
README's LNS section): a sign ``s``, a per-tensor largest magnitude ``w_max``
(Madam's weight bound, :func:`madam_optax.initial_max_magnitude`), and a
level ``k`` in ``0 .. levels-1``. It is stored as one signed integer, the
*code*

``c = s * (levels - k)``,  so ``|c|`` runs from 1 (smallest magnitude) to
``levels`` (``|w| = w_max``), and ``c = 0`` is an exact zero.

Codes are ordered like the weights they stand for. With at most 127 levels a
code fits in ``int8`` (1 byte per weight); up to 32767 levels it fits in
``int16``. This module owns every conversion between codes, levels and values,
the rounding of fractional levels, and the projection of floats onto the grid;
the transforms (:func:`madam_optax.log_quantise`,
:func:`madam_optax.lns_level_step`) are built on it.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
from typing import Any, Callable, TypeVar
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from madam_optax._src import magnitude_bound
from madam_optax._src import numerics
from madam_optax._src import tree_utils
from madam_optax._src import validation

INT8_MAX_LEVELS = 127
INT16_MAX_LEVELS = 32767
ROUNDINGS = ("nearest", "stochastic")

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class LNSFormat:
  r"""An LNS grid: ``levels`` magnitudes, consecutive ones a factor ``base`` apart.

  The magnitudes are :math:`w_{max} \cdot base^{-k}`, :math:`k = 0 ..
  levels-1`, so the grid spans a ratio :math:`base^{levels-1}` below the
  per-tensor :math:`w_{max}`. A format is an immutable, hashable value: it can
  be a static argument of ``jax.jit`` and it can also be passed as an ordinary
  argument (it is a pytree with no leaves).

  Attributes:
    levels: number of magnitude levels (2 .. 32767). Up to 127 the codes are
      ``int8``, above that ``int16``.
    base: ratio between consecutive levels, ``> 1``.

  Example:
    >>> import madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=127, base=1.03)
    >>> fmt.dtype, round(fmt.log_base, 5)
    (dtype('int8'), 0.02956)
    >>> madam_optax.LNSFormat.spanning(levels=4096, log_range=4.095).dtype
    dtype('int16')
  """

  levels: int
  base: float

  def __post_init__(self):
    levels, base = self.levels, self.base
    if not isinstance(levels, (int, np.integer)) or isinstance(
      levels, (bool, np.bool_)
    ):
      raise ValueError(
        f"LNSFormat.levels must be a Python int, got {levels!r}."
      )
    if levels < 2 or levels > INT16_MAX_LEVELS:
      raise ValueError(
        f"LNSFormat.levels={levels} is out of range: codes are int8 for up "
        f"to {INT8_MAX_LEVELS} levels and int16 for up to "
        f"{INT16_MAX_LEVELS}; choose 2 <= levels <= {INT16_MAX_LEVELS}."
      )
    b = validation.concrete_value(base)
    if b is None or not math.isfinite(b) or b <= 1.0:
      raise ValueError(
        f"LNSFormat.base must be a finite number > 1, got {base!r}."
      )
    object.__setattr__(self, "levels", int(levels))
    object.__setattr__(self, "base", float(b))

  @property
  def dtype(self) -> np.dtype:
    """``int8`` for at most 127 levels, ``int16`` above."""
    return np.dtype(np.int8 if self.levels <= INT8_MAX_LEVELS else np.int16)

  @property
  def log_base(self) -> float:
    """Natural log of ``base``: the step in ``log|w|`` between two levels."""
    return math.log(self.base)

  @property
  def bits(self) -> int:
    """Storage bits per weight (8 or 16), sign included."""
    return 8 * self.dtype.itemsize

  @classmethod
  def spanning(cls, levels: int, log_range: float = 4.0) -> LNSFormat:
    """The format whose ``levels`` magnitudes span ``exp(log_range)``.

    The smallest magnitude is ``w_max * exp(-log_range)``; ``base`` is
    ``exp(log_range / (levels - 1))``.
    """
    if not isinstance(levels, (int, np.integer)) or levels < 2:
      raise ValueError(f"levels must be an integer >= 2, got {levels!r}.")
    validation.check_hyperparameter(
      "log_range", log_range, low=0.0, low_inclusive=False
    )
    return cls(int(levels), math.exp(log_range / (levels - 1)))


jax.tree_util.register_pytree_node(
  LNSFormat,
  lambda fmt: ((), (fmt.levels, fmt.base)),
  lambda aux, _: LNSFormat(*aux),
)

# The paper's integer variant: natural-log base e**0.001 and 4096 levels.
REFERENCE_FORMAT = LNSFormat(levels=4096, base=math.exp(0.001))


def check_format(fmt: Any) -> None:
  """Raises ``ValueError`` unless ``fmt`` is an :class:`LNSFormat`."""
  if not isinstance(fmt, LNSFormat):
    raise ValueError(
      f"expected an LNSFormat, got {type(fmt).__name__}; build one with "
      "`madam_optax.LNSFormat(levels, base)` or `LNSFormat.spanning(levels)`."
    )


def check_rounding(rounding: str) -> None:
  """Raises ``ValueError`` unless ``rounding`` is ``nearest`` or ``stochastic``."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")


def check_code_leaves(codes: Any, fmt: LNSFormat, transform: str) -> None:
  """Raises ``ValueError`` for a leaf that is not integers able to hold ``fmt``."""
  for path, c in tree_utils.leaves_with_path(codes):
    name = tree_utils.leaf_name(path)
    dtype = validation.leaf_dtype(c)
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(
        f"{transform}: params leaf {name} has dtype {dtype}, but this "
        "transform updates integer LNS codes. Encode the weights with "
        "`madam_optax.lns_encode_tree`, and send float leaves (e.g. "
        "zero-initialised biases) to an additive optimizer with "
        "`madam_optax.with_additive_fallback(codes, lns_madam(fmt))`."
      )
    if fmt.levels > np.iinfo(dtype).max:
      raise ValueError(
        f"{transform}: params leaf {name} is {dtype}, which cannot hold "
        f"codes up to +-{fmt.levels} (LNSFormat.levels={fmt.levels}); "
        f"encode with this format (it uses {fmt.dtype})."
      )


def renamed_keyword(old: str, new: str) -> Callable[[_F], _F]:
  """Accepts keyword ``old`` as a deprecated spelling of ``new`` for a release."""

  def decorator(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if old in kwargs:
        warnings.warn(
          f"{fn.__name__}({old}=...) is deprecated; use {new}=... (the same "
          "value under the name used across madam_optax).",
          DeprecationWarning,
          stacklevel=2,
        )
        if new in kwargs:
          raise TypeError(
            f"{fn.__name__}: pass {new}, not both {old} and {new}."
          )
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

  return decorator


# Codes <-> levels <-> values. ``k`` is the level (0 = the largest magnitude).


def codes_from_levels(
  sign: jax.Array, k: jax.Array, fmt: LNSFormat
) -> jax.Array:
  """Integer codes ``sign * (levels - k)`` (int32) for integral levels ``k``."""
  return (sign * (fmt.levels - k)).astype(jnp.int32)


def levels_from_codes(codes: jax.Array, fmt: LNSFormat) -> jax.Array:
  """Levels ``k = levels - |c|`` (int32; ``levels`` for the zero code)."""
  return fmt.levels - jnp.abs(codes.astype(jnp.int32))


def level_of_value(
  w: jax.Array, max_magnitude: Any, fmt: LNSFormat
) -> jax.Array:
  r"""Continuous level :math:`\log(w_{max}/|w|) / \log(base)` (``inf`` at 0)."""
  w = jnp.asarray(w)
  w = w.astype(numerics.compute_dtype(w.dtype))
  return (
    jnp.log(jnp.asarray(max_magnitude, w.dtype)) - jnp.log(jnp.abs(w))
  ) / fmt.log_base


@functools.cache
def _log2_head_and_tail(base: float, nmant: int) -> tuple[float, float]:
  """``log2(base)`` as a head of ``nmant + 1 - 15`` significant bits (so
  that a level difference, below ``INT16_MAX_LEVELS + 1 = 2**15``, times it
  is exact with ``nmant`` mantissa bits) and a tail, from 40 digits
  (``base`` is a float, exactly a ``Decimal``), so that the tail is right to
  its last bit in float64 too."""
  with decimal.localcontext() as context:
    context.prec = 40
    log2_base = decimal.Decimal(base).ln() / decimal.Decimal(2).ln()
    bits = nmant + 1 - INT16_MAX_LEVELS.bit_length()
    exponent = math.frexp(float(log2_base))[1]
    head = math.ldexp(
      round(math.ldexp(float(log2_base), bits - exponent)), exponent - bits
    )
    return head, float(log2_base - decimal.Decimal(head))


def _base_to_the(n: jax.Array, fmt: LNSFormat) -> jax.Array:
  r""":math:`base^n` for integer-valued ``n`` (:math:`|n| < 2^{15}`, float32
  or float64), within a few ulps.

  ``exp(n * log(base))`` rounds its argument, an error of up to
  :math:`|n \log base|` ulps of 1 in the result (up to 28 float32 ulps
  with 1000 levels spanning :math:`e^{20}`). Instead
  :math:`n \log_2 base = m + f` with an integer :math:`m` and
  :math:`|f| \le 1/2`: :math:`\log_2 base` is split into a head short
  enough that :math:`n` times it is exact, whose nearest integer :math:`m`
  leaves an exact remainder, and a tail, whose product with :math:`n` is
  small; then :math:`base^n = 2^m\, 2^f`, with :math:`2^m` exact.
  """
  dtype = np.dtype(n.dtype)
  head, tail = _log2_head_and_tail(fmt.base, np.finfo(dtype).nmant)
  product = lax.mul(n, np.asarray(head, dtype))  # exact
  m = lax.round(product, lax.RoundingMethod.TO_NEAREST_EVEN)
  f = lax.add(
    lax.sub(product, m),  # exact: |product - m| <= 1/2, on product's grid
    lax.mul(n, np.asarray(tail, dtype)),
  )
  return jnp.ldexp(jnp.exp2(f), lax.convert_element_type(m, np.int32))


def values_from_codes(
  codes: jax.Array, max_magnitude: Any, fmt: LNSFormat, dtype: Any
) -> jax.Array:
  r"""Weights :math:`\mathrm{sign}(c)\, w_{max}\, base^{|c| - levels}` (0 at 0).

  Computed in the compute dtype (float32, or float64 for float64), each
  within a few ulps of the exact grid point before the rounding to ``dtype``
  (see :func:`_base_to_the`).
  """
  ct = numerics.compute_dtype(dtype)
  mag = jnp.abs(codes).astype(ct)
  w = (
    jnp.sign(codes).astype(ct)
    * jnp.asarray(max_magnitude, ct)
    * _base_to_the(mag - fmt.levels, fmt)
  )
  return w.astype(dtype)


# Random bits for stochastic rounding. ``"hash"`` (the default) derives them
# from a counter: an integer hash of (seed, step, tensor, element index), a
# few integer operations per weight, reproducible, and the same however the
# tensor is sharded (the element index is the global one). ``"threefry"``
# draws them with ``jax.random`` (several times the cost of the whole step on
# CPU), splitting the state's key every step.
RANDOM_BITS = ("hash", "threefry")

_U32 = np.uint32


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash ("lowbias32", C. Wellons): xor-shift,
  multiply, xor-shift, multiply, xor-shift; every input bit reaches every
  output bit."""
  x = lax.bitwise_xor(x, lax.shift_right_logical(x, _U32(16)))
  x = lax.mul(x, _U32(0x21F0AAAD))
  x = lax.bitwise_xor(x, lax.shift_right_logical(x, _U32(15)))
  x = lax.mul(x, _U32(0x735A2D97))
  return lax.bitwise_xor(x, lax.shift_right_logical(x, _U32(15)))


def check_random_bits(rng: str) -> None:
  """Raises ``ValueError`` unless ``rng`` is ``hash`` or ``threefry``."""
  if rng not in RANDOM_BITS:
    raise ValueError(f"rng must be one of {RANDOM_BITS}, got {rng!r}.")


def initial_key(seed: Any, rng: str) -> jax.Array:
  """The ``uint32[2]`` key a state starts from.

  ``threefry``: ``jax.random.PRNGKey(seed)``. ``hash``: a 32-bit word hashed
  from the seed, and a step counter starting at 0.
  """
  key = jax.random.PRNGKey(seed)
  if rng == "threefry":
    return key
  word = _mix32(lax.bitwise_xor(key[1], _mix32(key[0])))
  return jnp.stack([word, jnp.zeros([], jnp.uint32)])


def split_key(
  key: jax.Array, n: int, rng: str = "hash"
) -> tuple[jax.Array, jax.Array]:
  """The carried key and ``n`` per-tensor keys (``uint32[n, 2]``).

  ``threefry`` splits ``key``. ``hash`` advances the step counter
  ``key[1]`` and hashes (seed word, step, tensor index) into two words per
  tensor.
  """
  if rng == "threefry":
    keys = jax.random.split(key, n + 1)
    return keys[0], keys[1:]
  word, step = key[0], key[1]
  base = _mix32(lax.bitwise_xor(word, _mix32(lax.add(step, _U32(0x9E3779B9)))))
  tensor = lax.iota(np.uint32, n)
  first = _mix32(
    lax.bitwise_xor(base, _mix32(lax.add(lax.mul(tensor, _U32(2)), _U32(1))))
  )
  second = _mix32(
    lax.add(base, _mix32(lax.add(lax.mul(tensor, _U32(2)), _U32(2))))
  )
  carried = jnp.stack([word, lax.add(step, _U32(1))])
  return carried, jnp.stack([first, second], axis=1)


def _flat_index(x: jax.Array) -> jax.Array:
  """Each element's row-major index in ``x`` (``uint32``, modulo 2**32),
  laid out (and, under explicit sharding, sharded) like ``x``."""
  shape = jnp.shape(x)
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not getattr(getattr(sharding, "mesh", None), "explicit_axes", ()):
    sharding = None
  index = None
  stride = 1
  for dim in range(len(shape) - 1, -1, -1):
    term = lax.broadcasted_iota(np.uint32, shape, dim, out_sharding=sharding)
    if stride != 1:
      term = lax.mul(term, _U32(stride % 2**32))
    index = term if index is None else lax.add(index, term)
    stride *= shape[dim]
  if index is None:  # a scalar
    index = jnp.zeros(shape, np.uint32)
  return index


def uniform_from_hash(key: jax.Array, x: jax.Array) -> jax.Array:
  """Uniform ``[0, 1)`` numbers, one per element of ``x`` (24 random bits
  each, in ``x``'s dtype), from the tensor's key ``uint32[2]``.

  With ``i`` the element's index, ``y = (i ^ key[1]) * 0x9E3779B9 + key[0]``
  (a bijection of ``i``) and the bits are the top 24 of
  ``(y ^ (y >> 16)) * 0x21F0AAAD``: two multiplications, which carry every
  bit of the index into the top bits, and six more integer operations.
  """
  y = lax.add(
    lax.mul(lax.bitwise_xor(_flat_index(x), key[1]), _U32(0x9E3779B9)), key[0]
  )
  y = lax.mul(
    lax.bitwise_xor(y, lax.shift_right_logical(y, _U32(16))), _U32(0x21F0AAAD)
  )
  top = lax.convert_element_type(lax.shift_right_logical(y, _U32(8)), np.int32)
  return lax.mul(
    lax.convert_element_type(top, x.dtype), np.asarray(2.0**-24, x.dtype)
  )


def round_levels(
  x: jax.Array, rounding: str, key: jax.Array | None, rng: str = "hash"
) -> jax.Array:
  r"""Rounds fractional level counts to integers (still float dtype).

  ``nearest`` rounds half to even; ``stochastic`` returns
  :math:`\lfloor x + U \rfloor` with :math:`U` uniform on ``[0, 1)``, which
  is :math:`\lceil x \rceil` with probability :math:`x - \lfloor x
  \rfloor`, so its expectation is :math:`x` (up to the resolution of
  :math:`U`, :math:`2^{-24}`, and the rounding of :math:`x + U`, half an ulp
  of :math:`x`). :math:`U` comes from :func:`uniform_from_hash`
  (``rng="hash"``) or ``jax.random.uniform`` (``"threefry"``); ``key`` is
  the tensor's key from :func:`split_key`.
  """
  if rounding == "nearest":
    return jnp.round(x)
  assert key is not None
  if rng == "threefry":
    return jnp.floor(x + jax.random.uniform(key, jnp.shape(x), x.dtype))
  return lax.floor(lax.add(x, uniform_from_hash(key, x)))


def project_to_grid(
  x: jax.Array,
  max_magnitude: Any,
  fmt: LNSFormat,
  rounding: str = "nearest",
  key: jax.Array | None = None,
  rng: str = "hash",
) -> jax.Array:
  r"""The LNS grid point for each entry of ``x`` (same dtype; 0 stays 0).

  The level :math:`\log(w_{max}/|x|)/\log(base)` is rounded (to nearest, or
  stochastically and unbiased in the level) and clamped to
  ``0 .. levels-1``; the sign of ``x`` is kept.
  """
  level = level_of_value(x, max_magnitude, fmt)
  level = jnp.where(x == 0, fmt.levels - 1, level)  # finite for the rounding
  k = jnp.clip(round_levels(level, rounding, key, rng), 0, fmt.levels - 1)
  codes = codes_from_levels(jnp.sign(x), k, fmt)
  return values_from_codes(codes, max_magnitude, fmt, x.dtype)


def _check_max_magnitude(max_magnitude: Any, where: str) -> None:
  s = validation.concrete_value(max_magnitude)
  if s is not None and (not math.isfinite(s) or s <= 0.0):
    raise ValueError(
      f"{where}: the LNS max_magnitude must be finite and > 0, got {s}. An "
      "all-zero (or empty) tensor has none: keep it in float and train it "
      "additively (`madam_optax.with_additive_fallback`), or pass "
      "`max_magnitude=`."
    )


@renamed_keyword("scale", "max_magnitude")
def lns_encode(
  w: jax.Array,
  fmt: LNSFormat,
  max_magnitude: Any = None,
  *,
  p_scale: float = 3.0,
) -> tuple[jax.Array, jax.Array]:
  r"""Encodes float weights as LNS integer codes (nearest level in log space).

  .. math::

    k = \mathrm{clip}(\mathrm{round}(\log(w_{max}/|w|)/\log(base)),\ 0,\
        levels-1), \qquad c = \mathrm{sign}(w)\,(levels - k),

  with :math:`c = 0` for :math:`w = 0`. Magnitudes above :math:`w_{max}` are
  clamped to it and magnitudes below the smallest level are raised to it; in
  between, :math:`|\log|\hat w| - \log|w|| \le \log(base)/2` (half a level).
  :math:`w_{max}` is computed without overflow or underflow for any finite
  tensor in any float dtype (:func:`madam_optax.initial_max_magnitude`).

  Non-finite weights are refused (``ValueError``) when ``w`` is concrete.
  Under ``jax.jit``, where nothing can be raised, the mapping is fixed: a NaN
  weight (or a NaN ``max_magnitude``) gives code 0, an exact zero, and an
  infinite weight the largest magnitude of its sign.

  Args:
    w: a floating-point array.
    fmt: the :class:`LNSFormat`.
    max_magnitude: the per-tensor :math:`w_{max}`; default
      :func:`madam_optax.initial_max_magnitude` ``(w, p_scale)``.
    p_scale: multiple of the RMS used when ``max_magnitude`` is not given.

  Returns:
    ``(codes, max_magnitude)``: codes of dtype ``fmt.dtype`` and a scalar in
    ``w``'s compute dtype (float32, or float64 for float64 weights).

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=8, base=2.0)
    >>> codes, w_max = madam_optax.lns_encode(
    ...     jnp.array([1.0, -0.5, 0.26, 0.0]), fmt, max_magnitude=1.0)
    >>> codes
    Array([ 8, -7,  6,  0], dtype=int8)
    >>> madam_optax.lns_decode(codes, w_max, fmt)
    Array([ 1.  , -0.5 ,  0.25,  0.  ], dtype=float32)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  check_format(fmt)
  if max_magnitude is None:
    validation.check_hyperparameter(
      "p_scale", p_scale, low=0.0, low_inclusive=False
    )
  dtype = validation.leaf_dtype(w)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"lns_encode needs floating-point weights, got dtype {dtype}. Integer "
      "arrays may already be codes: decode them with `lns_decode`, or cast "
      "real weights with `.astype(jnp.float32)`."
    )
  w = jnp.asarray(w)
  validation.check_finite_if_concrete(w, "lns_encode: the weight array")
  ct = numerics.compute_dtype(w.dtype)
  max_magnitude = (
    magnitude_bound.initial_max_magnitude(w, p_scale)
    if max_magnitude is None
    else jnp.asarray(max_magnitude, ct)
  )
  _check_max_magnitude(max_magnitude, "lns_encode")
  level = level_of_value(w, max_magnitude, fmt)
  k = jnp.clip(jnp.round(level), 0, fmt.levels - 1)
  codes = codes_from_levels(jnp.sign(w), k, fmt)
  # NaN (traced input only) maps to the zero code, never to a cast of NaN.
  codes = jnp.where(jnp.isnan(level), 0, codes)
  return codes.astype(fmt.dtype), max_magnitude


@renamed_keyword("scale", "max_magnitude")
def lns_decode(
  codes: jax.Array, max_magnitude: Any, fmt: LNSFormat, dtype: Any = jnp.float32
) -> jax.Array:
  r"""Decodes LNS integer codes: :math:`w = \mathrm{sign}(c)\, w_{max}\,
  base^{|c| - levels}`, and 0 for :math:`c = 0`.

  Args:
    codes: integer codes (from :func:`lns_encode` or ``lns_madam``).
    max_magnitude: the per-tensor :math:`w_{max}`.
    fmt: the :class:`LNSFormat`.
    dtype: the floating-point dtype of the result.

  Returns:
    The weights, of ``dtype``.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=10.0)
    >>> w = madam_optax.lns_decode(jnp.array([4, -3, 1, 0], jnp.int8), 2.0, fmt)
    >>> [round(float(x), 6) for x in w]
    [2.0, -0.2, 0.002, 0.0]
  """
  check_format(fmt)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(
      f"lns_decode needs integer codes, got dtype {codes.dtype}; encode "
      "float weights with `lns_encode` first."
    )
  return values_from_codes(codes, max_magnitude, fmt, dtype)


def lns_scale(w: jax.Array, p_scale: float = 3.0) -> jax.Array:
  """Deprecated alias of :func:`madam_optax.initial_max_magnitude`.

  Kept for one release; it returns the same value (in ``w``'s compute dtype).
  """
  warnings.warn(
    "madam_optax.lns_scale is deprecated; use "
    "madam_optax.initial_max_magnitude (the same w_max).",
    DeprecationWarning,
    stacklevel=2,
  )
  return magnitude_bound.initial_max_magnitude(jnp.asarray(w), p_scale)
