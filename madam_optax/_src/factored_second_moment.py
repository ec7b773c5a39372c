"""Factored second-moment normalisation: Madam's normaliser, Adafactor's memory.

Steps 2-4 of Madam with Adafactor's row and column statistics in place of the
full second moment of a matrix: :math:`O(m + n)` state instead of
:math:`O(mn)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import numerics
from madam_optax._src import second_moment
from madam_optax._src import tree_utils
from madam_optax._src import validation

_NAME = "scale_by_factored_second_moment"
# Powers of two are applied in this many pieces, each a normal number, so that
# a factor as large as (largest float / smallest normal float) is exact.
_PIECES = 3


class ScaleByFactoredSecondMomentState(NamedTuple):
  """State of :func:`scale_by_factored_second_moment`.

  Each of ``row_rms_hat``, ``col_rms_hat`` and ``rms_hat`` is a tree with the parameters'
  structure. A factored tensor (see :func:`factored_axes`) keeps its two
  statistics in ``row_rms_hat`` and ``col_rms_hat`` and a placeholder (a zero
  scalar) in ``rms_hat``; any other tensor keeps its full statistic in ``rms_hat``
  and placeholders in ``row_rms_hat`` and ``col_rms_hat``.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    row_rms_hat: for a factored tensor, the root of the bias-corrected EMA
      of the squared gradients' mean over the column axis: the tensor's
      shape without that axis.
    col_rms_hat: the same over the row axis: the shape without the row axis.
    rms_hat: for an unfactored tensor, ``sqrt(v_hat)`` per entry, as in
      :class:`madam_optax.ScaleBySecondMomentState`.

  In earlier versions the fields were ``row_rms``, ``col_rms`` and ``rms`` and held
  the roots of the un-bias-corrected averages.
  """

  count: jax.Array  # type: ignore[assignment]
  row_rms_hat: Any
  col_rms_hat: Any
  rms_hat: Any


def factored_axes(
  shape: Sequence[int], min_dim_size_to_factor: int = 128
) -> tuple[int, int] | None:
  """The (row, column) axes a tensor of ``shape`` is factored over, or None.

  Adafactor's rule (as ``optax.scale_by_factored_rms``): the two largest
  dimensions, when the smaller of them has at least
  ``min_dim_size_to_factor`` entries; of equal sizes the later axis counts
  as the larger. The axes are returned in the tensor's order (row axis
  first); every other axis is a batch axis with statistics of its own (a
  convolution kernel ``(kh, kw, c_in, c_out)`` gets ``kh * kw`` factored
  ``c_in x c_out`` matrices).

  Args:
    shape: the tensor's shape.
    min_dim_size_to_factor: the smallest size both axes must have.

  Returns:
    ``(row_axis, col_axis)`` with ``row_axis < col_axis``, or ``None`` for a
    tensor with the full second moment.

  Example:
    >>> from madam_optax._src.factored_second_moment import factored_axes
    >>> factored_axes((768, 3072)), factored_axes((3, 3, 256, 512))
    ((0, 1), (2, 3))
    >>> print(factored_axes((768,)), factored_axes((50, 768)))
    None None
  """
  if len(shape) < 2:
    return None
  by_size = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
  smaller, larger = by_size[-2], by_size[-1]
  if shape[smaller] < min_dim_size_to_factor:
    return None
  return min(smaller, larger), max(smaller, larger)


# --------------------------------------------------------- exact power of two


def _power_of_two(k: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**k`` in ``dtype`` for integer ``k`` in its normal range, from bits."""
  info = np.finfo(dtype)
  int_dtype = np.dtype(f"int{info.bits}")
  biased = lax.add(
    lax.convert_element_type(k, int_dtype),
    np.asarray(info.maxexp - 1, int_dtype),
  )
  return lax.bitcast_convert_type(
    lax.shift_left(biased, np.asarray(info.nmant, int_dtype)), dtype
  )


def _times_power_of_two(x: jax.Array, k: jax.Array, pieces: int) -> jax.Array:
  """``x * 2**k`` (``k`` an integer array of ``x``'s shape), exactly.

  ``2**k`` is applied as ``pieces`` factors of equal sign, each a normal
  number, so the partial products move monotonically from ``x`` to the
  result: none over- or underflows unless the result does, and each product
  only changes the exponent (exact in the normal range). ``k`` beyond
  ``pieces`` times the largest normal exponent is clamped there (the result
  is then ``inf`` or ``0`` either way).
  """
  dtype = x.dtype
  limit = np.finfo(dtype).maxexp - 2
  k = lax.clamp(
    np.asarray(-pieces * limit, k.dtype), k, np.asarray(pieces * limit, k.dtype)
  )
  q = lax.div(k, np.asarray(pieces, k.dtype))  # k / pieces, toward zero
  r = lax.sub(k, lax.mul(q, np.asarray(pieces, k.dtype)))  # same sign as k
  step = lax.sign(r)
  small = _power_of_two(q, dtype)
  big = _power_of_two(lax.add(q, step), dtype)  # 2**(q +- 1)
  for i in range(pieces):
    # |r| of the pieces take the exponent q + sign(k), the others q.
    takes_big = lax.gt(lax.abs(r), np.asarray(i, k.dtype))
    x = lax.mul(x, lax.select(takes_big, big, small))
  return x


def _expand(v: jax.Array, axis: int, shape: Sequence[int]) -> jax.Array:
  """Broadcasts ``v`` (``shape`` without ``axis``) back to ``shape``."""
  dims = tuple(d for d in range(len(shape)) if d != axis)
  return lax.broadcast_in_dim(v, tuple(shape), dims)


def _rms_along(x: jax.Array, axis: int) -> jax.Array:
  """``sqrt(mean(x**2, axis))`` (``axis`` removed), never over/underflowing.

  Each slice along ``axis`` is multiplied by the power of two that brings its
  largest magnitude into ``[2, 4)`` (exact), squared and averaged there, and
  the root scaled back: gradients of 1e-30 or 1e30 give their RMS to float
  rounding, slice by slice, whatever the other slices hold, and never more
  than the slice's largest magnitude. An all-zero slice gives 0.
  """
  dtype = x.dtype
  largest = lax.reduce_max(lax.abs(x), (axis,))
  _, e = jnp.frexp(largest)  # largest = f * 2**e, f in [.5, 1)
  # 2 - e is in the normal range for every normal `largest`; clamped for
  # subnormal ones (XLA flushes those anyway).
  to_unit = lax.min(
    lax.sub(np.asarray(2, e.dtype), e),
    np.asarray(np.finfo(dtype).maxexp - 1, e.dtype),
  )
  scaled = lax.mul(x, _expand(_power_of_two(to_unit, dtype), axis, x.shape))
  mean_sq = lax.div(
    lax.reduce_sum(lax.mul(scaled, scaled), (axis,)),
    np.asarray(x.shape[axis], dtype),
  )
  rms = _times_power_of_two(lax.sqrt(mean_sq), lax.neg(to_unit), 2)
  # At most the largest magnitude, also where rounding would exceed it (to
  # inf at float32's largest value); an inf entry still gives inf.
  return lax.select(lax.gt(rms, largest), largest, rms)


def _mantissa_exponent(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, e)`` with ``x = m * 2**e``, ``m`` in ``[0.5, 1)``; ``(0, 0)``
  where ``x`` is not a positive finite number."""
  m, e = jnp.frexp(x)
  usable = lax.bitwise_and(lax.gt(x, np.asarray(0, x.dtype)), lax.is_finite(x))
  return (
    lax.select(usable, m, lax.full_like(m, 0)),
    lax.select(usable, e, lax.full_like(e, 0)),
  )


def _ratio(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x / y`` where ``y > 0``, else 0."""
  positive = lax.gt(y, np.asarray(0, y.dtype))
  q = lax.div(x, lax.select(positive, y, lax.full_like(y, 1)))
  return lax.select(positive, q, lax.full_like(q, 0))


def factored_leaf(
  g: jax.Array,
  row: jax.Array,
  col: jax.Array,
  axes: tuple[int, int],
  coefficients: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One factored tensor's step: ``(update, new row_rms_hat, new col_rms_hat)``.

  The maths of :func:`scale_by_factored_second_moment`, with the statistics
  kept as roots (``row_rms_hat``, ``col_rms_hat``) and updated with ``hypot``, and the
  update ``g * R / (row_i * col_j)`` formed from mantissas and
  exponents, so that no intermediate over- or underflows.
  """
  ct = numerics.compute_dtype(g.dtype)
  g_ = lax.convert_element_type(g, ct)
  sqrt_a, sqrt_1ma = (lax.convert_element_type(c, ct) for c in coefficients)
  row_axis, col_axis = axes

  def ema(old, now):
    old = lax.convert_element_type(old, ct)
    new = numerics.hypot(old, now, sqrt_a, sqrt_1ma)
    # At most the larger input, also where rounding would exceed it (inf at
    # float32's largest value); an inf or NaN input still gives a non-finite
    # statistic, caught below.
    top = lax.max(old, now)
    new = lax.select(lax.gt(new, top), top, new)
    # Non-finite only where its row (column) holds a NaN or inf gradient,
    # since the root mean square of finite entries never overflows: that
    # statistic stays as it was.
    return lax.select(lax.is_finite(new), new, old)

  new_row = ema(row, _rms_along(g_, col_axis))  # g's shape without col_axis
  new_col = ema(col, _rms_along(g_, row_axis))  # ... without row_axis
  # R = sqrt(mean_i r_i): the root of the rows' mean (row_axis < col_axis, so
  # the row axis keeps its index in new_row).
  overall = _rms_along(new_row, row_axis)

  # u_ij = g_ij * b_i * c_j with b_i = R / row_i, c_j = 1/col_j (the
  # statistics are bias-corrected: no correction factor is left),
  # each as a mantissa in [0.5, 1) and an exponent. A zero statistic (its
  # gradients were all zero, so g_ij = 0 too) gets b_i = 0 or c_j = 0:
  # 0/0 := 0.
  m_all, e_all = _mantissa_exponent(_expand(overall, row_axis, new_row.shape))
  m_row, e_row = _mantissa_exponent(new_row)
  m_b, e_b = _mantissa_exponent(_ratio(m_all, m_row))
  e_b = lax.add(e_b, lax.sub(e_all, e_row))
  m_col, e_col = _mantissa_exponent(new_col)
  m_c, e_c = _mantissa_exponent(_ratio(lax.full_like(m_col, 1), m_col))
  e_c = lax.sub(e_c, e_col)

  shape = g.shape
  # g's own mantissa too: a product of three mantissas in [0.5, 1) stays
  # normal where g itself, times two of them, could not (g near 1e-38).
  m_g, e_g = jnp.frexp(g_)
  mantissa = lax.mul(
    m_g, lax.mul(_expand(m_b, col_axis, shape), _expand(m_c, row_axis, shape))
  )
  exponent = lax.add(
    e_g,
    lax.add(_expand(e_b, col_axis, shape), _expand(e_c, row_axis, shape)),
  )
  u = _times_power_of_two(mantissa, exponent, _PIECES)
  # The rank-one fit can ask for more than the dtype holds (a lone 1 in a
  # row and column beside a 1e38 elsewhere): it saturates, sign kept.
  largest = np.asarray(jnp.finfo(g.dtype).max, ct)
  u = lax.clamp(lax.neg(largest), u, largest)
  return (
    lax.convert_element_type(u, g.dtype),
    numerics.to_state_dtype(new_row, row.dtype),
    numerics.to_state_dtype(new_col, col.dtype),
  )


def _zeros_without_axis(p: Any, axis: int, dtype: Any) -> jax.Array:
  """Zeros of ``p``'s shape without ``axis``, sharded like ``p`` there."""
  # The reduction's result carries p's sharding of the remaining axes (with
  # explicit mesh axes in its type; eagerly as the computed layout), so each
  # statistic is sharded along its dimension. Only its layout is used.
  # A tensor known by shape (jax.ShapeDtypeStruct) gives the same, abstractly.
  if tree_utils.is_abstract(p):
    return jnp.zeros_like(
      jax.eval_shape(lambda q: jnp.sum(q, axis=axis), p), dtype=dtype
    )
  return jnp.zeros_like(jnp.sum(p, axis=axis), dtype=dtype)


def _placeholder(dtype: Any) -> jax.Array:
  """The unused statistics of a tensor: one zero (Orbax refuses empty arrays)."""
  return jnp.zeros((), dtype)


def scale_by_factored_second_moment(
  b2: float = 0.999,
  *,
  min_dim_size_to_factor: int = 128,
  state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Madam's normaliser with Adafactor's factored second moment.

  A tensor whose two largest dimensions both have at least
  ``min_dim_size_to_factor`` entries (:func:`factored_axes`; other axes are
  batch axes) keeps, instead of one second-moment entry per parameter, a
  statistic per row :math:`i` and per column :math:`j`. At step
  :math:`t = 1, 2, \dots`:

  .. math::

    r_i &\leftarrow \beta_2 r_i + (1 - \beta_2)\, \mathrm{mean}_j\, g_{ij}^2,
    \qquad
    c_j \leftarrow \beta_2 c_j + (1 - \beta_2)\, \mathrm{mean}_i\, g_{ij}^2,\\
    \hat v_{ij} &= \frac{r_i\, c_j}{\mathrm{mean}_i\, r_i}
      \Big/ (1 - \beta_2^t), \qquad
    u_{ij} = g_{ij} / \sqrt{\hat v_{ij}},

  with :math:`0/0 := 0` and no epsilon: Adafactor's rank-one estimate of the
  second moment (Shazeer & Stern, 2018, Algorithm 4; its row and column
  *means*, so :math:`\mathrm{mean}_i\, r_i = \mathrm{mean}_j\, c_j` is the mean
  of the full second moment), bias-corrected as Madam's. Every other tensor
  gets the full second moment of :func:`madam_optax.scale_by_second_moment`
  (the same code): :math:`u = \mathrm{sign}(g)` exactly at :math:`t = 1`.

  Semantics of the factored estimate:

  * it is exact when the running second moment is rank one
    (:math:`v_{ij} = a_i b_j`), so that :math:`u` is then what the full
    normaliser gives: at :math:`t = 1`, when :math:`|g_{ij}| = a_i b_j`
    (for example :math:`|g|` constant), :math:`u_1 = \mathrm{sign}(g)` up to
    the rounding of the means (a few ulps, not bit for bit);
  * otherwise it is the rank-one fit, and :math:`|u_{ij}|` can exceed the
    full normaliser's bound :math:`\sqrt{1/(1-\beta_2)}` (an isolated large
    entry; beyond the largest finite value of the dtype it saturates there,
    sign kept); Madam's ``g_bound`` clip follows it;
  * an entry with a zero gradient gets a zero update, and a row or column
    whose gradients were always zero gets zero updates (0/0 := 0);
  * a non-finite gradient entry (NaN or inf) gets a NaN update (for
    :func:`madam_optax.apply_if_finite` to skip the step); the row and the
    column holding it keep their statistics as they were (a NaN would
    otherwise reach every later step through them), the others update as
    usual; an unfactored tensor keeps the statistic of that entry only, as
    :func:`madam_optax.scale_by_second_moment` does. No reduction is added:
    the row and column statistics already see the bad entry.

  The statistics are stored as bias-corrected roots
  (:math:`\sqrt{r_i / (1 - \beta_2^t)}`, :math:`\sqrt{c_j / (1 - \beta_2^t)}`,
  weighted root mean squares of the gradients, which stay in their range)
  and updated with ``hypot``, the weights
  :math:`\sqrt{a_t}, \sqrt{1 - a_t}` of
  :func:`madam_optax.scale_by_second_moment` applied after its scaling; each row's (column's) mean square is taken after
  scaling it by the power of two that brings its largest entry near 1, and
  the update is formed from mantissas and exponents: gradients of 1e-20 or
  1e30 in float32, or rows of both in one matrix, neither underflow nor
  overflow.

  Why not ``optax.scale_by_factored_rms``: its ``decay_rate_fn`` can express
  a constant :math:`\beta_2` with bias correction (the decay
  :math:`\beta_2 (1 - \beta_2^{t-1}) / (1 - \beta_2^t)` averages to
  :math:`\hat v` directly), but it adds ``epsilon`` to :math:`g^2`, and with
  ``epsilon=0`` (Madam's normaliser has none: it must be scale invariant) a
  zero row or column gives ``0 * inf = nan`` instead of :math:`0/0 := 0`;
  it squares the gradients in their own dtype (in float32, 1e-20 underflows
  and 1e30 overflows: ``nan`` updates); and it keeps its statistics in the
  parameters' dtype only. This module follows its factoring rule and
  Adafactor's maths, and reuses :func:`madam_optax.scale_by_second_moment`'s
  code for unfactored tensors.

  Under sharding each statistic is sharded like the dimension it keeps (a
  matrix sharded over rows and columns has ``row_rms_hat`` sharded over rows and
  ``col_rms_hat`` over columns). The means over a sharded dimension are
  reductions across devices: a factored tensor's update all-reduces its row
  and column sums (and the maxima used for scaling), which the full second
  moment never needs.

  Args:
    b2: decay rate of the moving averages, in ``[0, 1)``, and not so close
      to 1 that it rounds to 1.0 in float32 (refused).
    min_dim_size_to_factor: a tensor is factored when its two largest
      dimensions both have at least this many entries (Adafactor's 128 by
      default). A positive integer, used by ``init``: which tensors are
      factored is then fixed by the state's shapes (so a value injected by
      ``optax.inject_hyperparams`` only matters at ``init``).
    state_dtype: dtype of the statistics (``row_rms_hat``, ``col_rms_hat`` and
      ``rms_hat``). ``None`` (default) uses each parameter's dtype;
      ``jnp.bfloat16`` halves them. The maths always runs in at least float32.
      A dtype with a narrower range than a parameter's is refused, as in
      :func:`madam_optax.scale_by_second_moment`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.scale_by_factored_second_moment(
    ...     min_dim_size_to_factor=2)
    >>> g = {'w': jnp.array([[1.0, -2.0, 4.0], [-0.5, 1.0, -2.0]]),
    ...      'b': jnp.array([0.5, -3.0])}
    >>> state = tx.init(g)
    >>> state.row_rms_hat['w'].shape, state.col_rms_hat['w'].shape, state.rms_hat['b'].shape
    ((2,), (3,), (2,))
    >>> u, state = tx.update(g, state)   # |g| is rank one: sign(g)
    >>> u['w'].round(5), u['b']
    (Array([[ 1., -1.,  1.],
           [-1.,  1., -1.]], dtype=float32), Array([ 1., -1.], dtype=float32))

  References:
    Shazeer, Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, arXiv:1804.04235.

    Bernstein, Zhao, Meister, Liu, Anandkumar, Yue, "Learning compositional
    functions via multiplicative weight updates", NeurIPS 2020,
    arXiv:2006.14560.
  """
  validation.check_decay_rate("b2", b2)
  _check_min_dim(min_dim_size_to_factor)
  state_dtype = validation.check_state_dtype(state_dtype)

  def init_fn(params):
    validation.check_float_leaves(params, _NAME)
    validation.check_state_dtype_range(params, state_dtype, _NAME)
    min_dim = _check_min_dim(min_dim_size_to_factor, at_init=True)

    def leaf(p):
      # A Flax NNX Variable (its value, with metadata such as a sharding per
      # axis) keeps the metadata on the full statistic, which has its shape;
      # the factored statistics and placeholders are plain arrays.
      value = p.get_value() if tree_utils.is_variable(p) else p
      dtype = state_dtype or validation.leaf_dtype(value)
      if not tree_utils.is_abstract(value):
        value = jnp.asarray(value, dtype=validation.leaf_dtype(value))
      axes = factored_axes(value.shape, min_dim)
      if axes is None:
        full = jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype), p)
        return _placeholder(dtype), _placeholder(dtype), full
      row_axis, col_axis = axes
      return (
        _zeros_without_axis(value, col_axis, dtype),
        _zeros_without_axis(value, row_axis, dtype),
        _placeholder(dtype),
      )

    leaves, treedef = jax.tree.flatten(params, is_leaf=tree_utils.is_variable)
    outs = [leaf(p) for p in leaves]
    row_rms_hat, col_rms_hat, rms_hat = (
      treedef.unflatten([out[i] for out in outs]) for i in range(3)
    )
    return ScaleByFactoredSecondMomentState(
      count=jnp.zeros([], jnp.int32),
      row_rms_hat=row_rms_hat,
      col_rms_hat=col_rms_hat,
      rms_hat=rms_hat,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args  # accepted and ignored, as optax.chain passes them
    updates = validation.as_arrays(updates)
    validation.check_float_leaves(updates, _NAME, "updates")
    # Which tensors are factored was decided at init and is read from the
    # state's shapes: min_dim_size_to_factor may be a tracer here (under
    # optax.inject_hyperparams).
    all_axes = _axes_from_state(updates, state)
    count = optax.safe_increment(state.count)
    scalars = {}  # second_moment.moment_scalars per compute dtype

    def coefficients(dtype):
      ct = numerics.compute_dtype(dtype)
      if ct not in scalars:
        scalars[ct] = second_moment.moment_scalars(b2, count, ct)
      return scalars[ct]

    def leaf(g, row, col, r, axes):
      coeffs = coefficients(g.dtype)
      if axes is None:
        u, new_r = second_moment.second_moment_leaf(g, r, *coeffs)
        return u, row, col, new_r
      u, row, col = factored_leaf(g, row, col, axes, coeffs)
      # A non-finite entry: a NaN update there (its row's and column's
      # statistics were kept by factored_leaf).
      return (
        lax.select(lax.is_finite(g), u, lax.full_like(u, np.nan)),
        row,
        col,
        r,
      )

    # Each tree is rebuilt with its own structure: where the parameters are
    # Flax NNX Variables, the updates and the full statistics keep them and
    # the factored statistics are plain arrays (see init).
    trees = (updates, state.row_rms_hat, state.col_rms_hat, state.rms_hat)
    flat = [jax.tree.flatten(tree) for tree in trees]
    outs = [
      leaf(*args) for args in zip(*(leaves for leaves, _ in flat), all_axes)
    ]
    new_updates, row_rms_hat, col_rms_hat, rms_hat = (
      treedef.unflatten([out[i] for out in outs])
      for i, (_, treedef) in enumerate(flat)
    )
    return new_updates, ScaleByFactoredSecondMomentState(
      count=optax.safe_increment(state.count),
      row_rms_hat=row_rms_hat,
      col_rms_hat=col_rms_hat,
      rms_hat=rms_hat,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_min_dim(value: Any, at_init: bool = False) -> int | None:
  """``min_dim_size_to_factor`` as an int; ``ValueError`` unless a positive
  integer. A tracer passes (``None``) except at init, which needs the value."""
  concrete = validation.concrete_value(value)
  if isinstance(value, jax.core.Tracer):
    if at_init:
      raise ValueError(
        f"{_NAME}: min_dim_size_to_factor must be known when the state is "
        "initialised (it fixes the state's shapes), got a traced value. "
        "Under optax.inject_hyperparams pass "
        "static_args=('min_dim_size_to_factor',), or call init outside jit."
      )
    return None
  if (
    isinstance(value, bool)
    or concrete is None
    or concrete < 1
    or concrete != int(concrete)
  ):
    raise ValueError(
      f"min_dim_size_to_factor must be a positive integer, got {value!r}."
    )
  return int(concrete)


def _axes_from_state(
  updates: Any, state: ScaleByFactoredSecondMomentState
) -> list[tuple[int, int] | None]:
  """Each update leaf's factored axes (None: full), read from the state.

  A leaf whose ``rms_hat`` has its shape is unfactored; otherwise its ``row_rms_hat``
  and ``col_rms_hat`` must have the shapes :func:`factored_axes` gives. Anything
  else is a ``ValueError``: the state was built for other parameters.
  """
  # A Flax NNX Variable counts as one leaf, whether or not it is unwrapped.
  structure = jax.tree.structure(updates, is_leaf=tree_utils.is_variable)
  for what in ("row_rms_hat", "col_rms_hat", "rms_hat"):
    tree = getattr(state, what)
    if structure != jax.tree.structure(tree, is_leaf=tree_utils.is_variable):  # type: ignore[operator]
      raise ValueError(
        f"{_NAME}: the updates and optimizer-state trees do not match.\n"
        f"  updates: {structure}\n"
        f"  state.{what}: "
        f"{jax.tree.structure(tree, is_leaf=tree_utils.is_variable)}\n"
        "Pass gradients with exactly the structure of the parameters the "
        "optimizer was initialised with."
      )
  all_axes: list[tuple[int, int] | None] = []
  for (path, g), row, col, r in zip(
    tree_utils.leaves_with_path(updates),
    jax.tree.leaves(state.row_rms_hat),
    jax.tree.leaves(state.col_rms_hat),
    jax.tree.leaves(state.rms_hat),
  ):
    shape = tuple(jnp.shape(g))
    found = (tuple(jnp.shape(row)), tuple(jnp.shape(col)), tuple(jnp.shape(r)))
    axes = factored_axes(shape, 1)
    if found == ((), (), shape):
      all_axes.append(None)
      continue
    if axes is not None and found == (
      tuple(s for d, s in enumerate(shape) if d != axes[1]),
      tuple(s for d, s in enumerate(shape) if d != axes[0]),
      (),
    ):
      all_axes.append(axes)
      continue
    raise ValueError(
      f"{_NAME}: leaf {tree_utils.leaf_name(path)} has update shape "
      f"{shape}, but the state holds (row_rms_hat, col_rms_hat, rms_hat) of shapes "
      f"{found}, the statistics of a parameter of shape "
      f"{_parameter_shape(*found)}. Initialise the state with "
      "`tx.init(params)` on the same parameters."
    )
  return all_axes


def _parameter_shape(
  row: tuple[int, ...], col: tuple[int, ...], full: tuple[int, ...]
) -> tuple[int, ...] | str:
  """The shape of the parameter whose statistics have these shapes."""
  if not row and not col:
    return full
  # row is the shape without the column axis c, col without the row axis.
  for c in range(1, len(row) + 1):
    shape = row[:c] + col[c - 1 : c] + row[c:]
    axes = factored_axes(shape, 1)
    if axes is not None and axes[1] == c:
      if tuple(s for d, s in enumerate(shape) if d != axes[0]) == col:
        return shape
  return "unknown"
