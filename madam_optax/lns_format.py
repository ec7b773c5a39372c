"""The log-number-system (LNS) weight format: integer codes with the sign folded in.

A weight is ``w = s * scale * base**(-k)`` (SPEC §2): a sign ``s``, a per-tensor
``scale`` (the magnitude bound ``w_max``), and a level ``k`` in ``0 .. levels-1``.
It is stored as one signed integer, the *code*

``c = s * (levels - k)``,  so ``|c|`` runs from 1 (smallest magnitude) to
``levels`` (``|w| = scale``), and ``c = 0`` is an exact zero.

Codes are ordered like the weights they stand for. With at most 127 levels a
code fits in ``int8`` (1 byte per weight); up to 32767 levels it fits in
``int16``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from madam_optax import _checks
from madam_optax.partition import MULTIPLICATIVE
from madam_optax.partition import multiplicative_labels

INT8_MAX_LEVELS = 127
INT16_MAX_LEVELS = 32767


class LNSFormat(NamedTuple):
  r"""An LNS grid: ``levels`` magnitudes, consecutive ones a factor ``base`` apart.

  The magnitudes are :math:`scale \cdot base^{-k}`, :math:`k = 0 .. levels-1`,
  so the grid spans a ratio :math:`base^{levels-1}` below the per-tensor scale.

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

  @property
  def dtype(self) -> np.dtype:
    """``int8`` for at most 127 levels, ``int16`` above."""
    check_format(self)
    return np.dtype(np.int8 if self.levels <= INT8_MAX_LEVELS else np.int16)

  @property
  def log_base(self) -> float:
    """Natural log of ``base``: the step in ``log|w|`` between two levels."""
    check_format(self)
    return math.log(self.base)

  @property
  def bits(self) -> int:
    """Storage bits per weight (8 or 16), sign included."""
    return 8 * self.dtype.itemsize

  @classmethod
  def spanning(cls, levels: int, log_range: float = 4.0) -> "LNSFormat":
    """The format whose ``levels`` magnitudes span ``exp(log_range)``.

    The smallest magnitude is ``scale * exp(-log_range)``; ``base`` is
    ``exp(log_range / (levels - 1))``.
    """
    if not isinstance(levels, (int, np.integer)) or levels < 2:
      raise ValueError(f"levels must be an integer >= 2, got {levels!r}.")
    _checks.check_hyperparameter("log_range", log_range, low=0.0,
                                 low_inclusive=False)
    return cls(int(levels), math.exp(log_range / (levels - 1)))


# SPEC §2's integer variant: natural-log base e**0.001 and 4096 levels.
REFERENCE_FORMAT = LNSFormat(levels=4096, base=math.exp(0.001))


def check_format(fmt: LNSFormat) -> None:
  """Raises ``ValueError`` when ``fmt`` cannot be stored or is degenerate."""
  if not isinstance(fmt, LNSFormat):
    raise ValueError(
        f"expected an LNSFormat, got {type(fmt).__name__}; build one with "
        "`madam_optax.LNSFormat(levels, base)` or `LNSFormat.spanning(levels)`.")
  levels, base = fmt
  if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool):
    raise ValueError(f"LNSFormat.levels must be a Python int, got {levels!r}.")
  if levels < 2 or levels > INT16_MAX_LEVELS:
    raise ValueError(
        f"LNSFormat.levels={levels} is out of range: codes are int8 for up to "
        f"{INT8_MAX_LEVELS} levels and int16 for up to {INT16_MAX_LEVELS}; "
        "choose 2 <= levels <= 32767.")
  b = _checks.concrete_value(base)
  if b is None or not math.isfinite(b) or b <= 1.0:
    raise ValueError(
        f"LNSFormat.base must be a finite number > 1, got {base!r}.")


def _check_scale(scale, where: str) -> None:
  s = _checks.concrete_value(scale)
  if s is not None and (not math.isfinite(s) or s <= 0.0):
    raise ValueError(
        f"{where}: the LNS scale must be finite and > 0, got {s}. An all-zero "
        "tensor has no scale: keep it in float and train it additively "
        "(`madam_optax.with_additive_fallback`), or pass `scale=` explicitly.")


def lns_scale(w: jax.Array, p_scale: float = 3.0) -> jax.Array:
  r"""The per-tensor scale ``w_max = p_scale * sqrt(mean(w**2))`` (SPEC step 1).

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> madam_optax.lns_scale(jnp.array([3.0, -4.0]), p_scale=1.0)
    Array(3.535534, dtype=float32)
  """
  w32 = jnp.asarray(w).astype(_checks.compute_dtype(jnp.asarray(w).dtype))
  return (p_scale * jnp.sqrt(jnp.mean(jnp.square(w32)))).astype(jnp.float32)


def lns_level(w: jax.Array, scale, fmt: LNSFormat) -> jax.Array:
  r"""Continuous level :math:`\log(scale/|w|) / \log(base)` (float; ``inf`` at 0)."""
  w32 = jnp.asarray(w).astype(_checks.compute_dtype(jnp.asarray(w).dtype))
  return (jnp.log(jnp.asarray(scale, w32.dtype)) - jnp.log(jnp.abs(w32))) / (
      fmt.log_base)


def lns_encode(w: jax.Array, fmt: LNSFormat, scale=None, *,
               p_scale: float = 3.0) -> tuple[jax.Array, jax.Array]:
  r"""Encodes float weights as LNS integer codes (nearest level in log space).

  .. math::

    k = \mathrm{clip}(\mathrm{round}(\log(scale/|w|)/\log(base)),\ 0,\
        levels-1), \qquad c = \mathrm{sign}(w)\,(levels - k),

  with :math:`c = 0` for :math:`w = 0`. Magnitudes above ``scale`` are clamped
  to it and magnitudes below the smallest level are raised to it; in between,
  :math:`|\log|\hat w| - \log|w|| \le \log(base)/2` (half a level).

  Args:
    w: a floating-point array.
    fmt: the :class:`LNSFormat`.
    scale: the per-tensor scale :math:`w_{max}`; default
      ``p_scale * sqrt(mean(w**2))`` (SPEC step 1).
    p_scale: multiple of the RMS used when ``scale`` is not given.

  Returns:
    ``(codes, scale)``: codes of dtype ``fmt.dtype`` and a float32 scalar.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=8, base=2.0)
    >>> codes, scale = madam_optax.lns_encode(
    ...     jnp.array([1.0, -0.5, 0.26, 0.0]), fmt, scale=1.0)
    >>> codes
    Array([ 8, -7,  6,  0], dtype=int8)
    >>> madam_optax.lns_decode(codes, scale, fmt)
    Array([ 1.  , -0.5 ,  0.25,  0.  ], dtype=float32)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560 (SPEC §2).
  """
  check_format(fmt)
  dtype = getattr(w, "dtype", None)
  if dtype is None:
    dtype = np.asarray(w).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"lns_encode needs floating-point weights, got dtype {dtype}. Integer "
        "arrays may already be codes: decode them with `lns_decode`, or cast "
        "real weights with `.astype(jnp.float32)`.")
  w = jnp.asarray(w)
  scale = lns_scale(w, p_scale) if scale is None else jnp.asarray(
      scale, jnp.float32)
  _check_scale(scale, "lns_encode")
  k = jnp.clip(jnp.round(lns_level(w, scale, fmt)), 0, fmt.levels - 1)
  k = jnp.where(w == 0, fmt.levels, k)          # |c| = 0: an exact zero
  codes = (jnp.sign(w) * (fmt.levels - k)).astype(fmt.dtype)
  return codes, scale


def lns_decode(codes: jax.Array, scale, fmt: LNSFormat,
               dtype: Any = jnp.float32) -> jax.Array:
  r"""Decodes LNS integer codes: :math:`w = \mathrm{sign}(c)\, scale\,
  base^{|c| - levels}`, and 0 for :math:`c = 0`.

  Args:
    codes: integer codes (from :func:`lns_encode` or ``lns_madam``).
    scale: the per-tensor scale.
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
        "float weights with `lns_encode` first.")
  ct = _checks.compute_dtype(dtype)
  mag = jnp.abs(codes).astype(ct)
  w = jnp.sign(codes).astype(ct) * jnp.asarray(scale, ct) * jnp.exp(
      (mag - fmt.levels) * jnp.asarray(fmt.log_base, ct))
  return w.astype(dtype)


def _is_none(x) -> bool:
  return x is None


def lns_encode_tree(params: Any, fmt: LNSFormat, *, p_scale: float = 3.0,
                    min_ndim: int = 0) -> tuple[Any, Any]:
  """Encodes every multiplicatively trained leaf of a tree as LNS codes.

  Leaves that :func:`madam_optax.multiplicative_labels` labels
  ``"multiplicative"`` become integer codes with scale
  ``p_scale * sqrt(mean(w0**2))``; the others (all-zero leaves such as Flax's
  default biases, and leaves with fewer than ``min_ndim`` dimensions) stay in
  float, to be trained additively (:func:`madam_optax.with_additive_fallback`).

  Args:
    params: a pytree of floating-point arrays (concrete; e.g. a Flax NNX
      ``nnx.State``).
    fmt: the :class:`LNSFormat`.
    p_scale: multiple of each tensor's RMS used as its scale.
    min_ndim: see :func:`madam_optax.multiplicative_labels`.

  Returns:
    ``(codes, scales)``: ``codes`` has the structure of ``params`` with integer
    leaves where encoded and the original float leaves elsewhere; ``scales``
    has a float32 scalar where encoded and ``None`` elsewhere.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat.spanning(127)
    >>> params = {'w': jnp.array([[0.5, -1.0]]), 'b': jnp.zeros(2)}
    >>> codes, scales = madam_optax.lns_encode_tree(params, fmt)
    >>> codes['w'].dtype, codes['b'].dtype, scales['b']
    (dtype('int8'), dtype('float32'), None)
    >>> w = madam_optax.lns_decode_tree(codes, scales, fmt)['w']
    >>> [round(float(x), 3) for x in w[0]]     # within half a level
    [0.501, -1.006]
  """
  check_format(fmt)
  _checks.check_float_leaves(params, "lns_encode_tree")

  def leaf(p):
    if multiplicative_labels(p, min_ndim=min_ndim) != MULTIPLICATIVE:
      return p, None
    return lns_encode(p, fmt, p_scale=p_scale)

  return _checks.tree_map_unzip(leaf, params)


def lns_decode_tree(codes: Any, scales: Any, fmt: LNSFormat,
                    dtype: Any = jnp.float32) -> Any:
  """Decodes the integer leaves of a tree from :func:`lns_encode_tree`.

  Leaves whose scale is ``None`` pass through unchanged.

  Args:
    codes: the codes tree.
    scales: the scales tree (``None`` where a leaf is not encoded).
    fmt: the :class:`LNSFormat`.
    dtype: floating-point dtype of the decoded weights.

  Returns:
    A tree of floating-point arrays with the structure of ``codes``.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=2.0)
    >>> madam_optax.lns_decode_tree(
    ...     {'w': jnp.array([4, -1], jnp.int8), 'b': jnp.ones(1)},
    ...     {'w': jnp.float32(1.0), 'b': None}, fmt)
    {'b': Array([1.], dtype=float32), 'w': Array([ 1.   , -0.125], dtype=float32)}
  """
  def leaf(scale, c):
    if scale is None:
      return c
    return lns_decode(c, scale, fmt, dtype)
  return jax.tree.map(leaf, scales, codes, is_leaf=_is_none)
