"""Magnitude bounding: steps 1 and 7 of Madam (a per-tensor clamp on weights).

Owns the one definition of the per-tensor bound
``w_max = p_scale * sqrt(mean(w0**2))`` (:func:`initial_max_magnitude`), which
the LNS format also uses as its largest magnitude.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import multiplicative_step
from madam_optax._src import numerics
from madam_optax._src import tree_utils
from madam_optax._src import validation


class ClipWeightMagnitudeState(NamedTuple):
  """State of :func:`clip_weight_magnitude`.

  Attributes:
    max_magnitude: a tree shaped like ``params`` with one scalar per tensor
      (float32, or float64 for float64 parameters): the bounds
      :math:`w_{max}` fixed at ``init``. Shaped like ``params``, so that
      ``optax.tree.map_params`` finds it; a Flax NNX ``Variable`` becomes a
      plain scalar there, so the Variable's sharding annotation is not
      copied onto it (:func:`madam_optax.state_shardings` gives it a
      replicated sharding). A flat tuple of the scalars, in
      ``jax.tree.leaves(params)`` order (madam-optax 0.2's format), is
      accepted too. Initialised from shapes (``jax.ShapeDtypeStruct``
      leaves), the bounds are ``jax.ShapeDtypeStruct`` scalars: they depend
      on the initial weights' values.
  """

  max_magnitude: Any


def initial_max_magnitude(params: Any, p_scale: Any = 3.0) -> Any:
  r"""The per-tensor weight bound :math:`w_{max}` fixed from initial weights.

  .. math::

    w_{max} = p_{scale} \sqrt{\mathrm{mean}(w_0^2)}

  (step 1 of Madam, Algorithm 1 of the paper; the README's maths table). It is
  both :func:`clip_weight_magnitude`'s bound and the LNS grid's largest
  magnitude (:func:`madam_optax.lns_encode`). The root mean square is computed
  with power-of-two scaling, so it neither overflows nor underflows for any
  finite tensor (weights of 1e30 or 1e-30 in float32, 1e300 in float64), and
  the bound is capped at the largest finite value of the tensor's dtype (a
  float16 tensor's bound is at most 65504); a non-zero tensor's bound is at
  least the smallest normal value of its compute dtype (about 1.2e-38 in
  float32), below which it would be flushed to 0, and a float16 tensor's at
  least float16's smallest subnormal value (about 6e-8), below which it
  would round to 0 in float16.

  Args:
    params: a pytree of floating-point arrays, or one array.
    p_scale: multiple of each tensor's initial RMS; a float or a scalar array.

  Returns:
    A pytree with the structure of ``params`` (a scalar for one array): one
    scalar per tensor, in the tensor's compute dtype (float32, or float64 for
    float64 tensors). An all-zero or empty tensor gives 0.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> madam_optax.initial_max_magnitude(jnp.array([3.0, -4.0]), p_scale=1.0)
    Array(3.535534, dtype=float32)
    >>> madam_optax.initial_max_magnitude({'w': jnp.array([1e30, -1e30])})
    {'w': Array(3.e+30, dtype=float32)}

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """

  def leaf(p):
    p = jnp.asarray(p)
    ct = numerics.compute_dtype(p.dtype)
    bound = numerics.scaled_root_mean_square(p.astype(ct), p_scale)
    bound = jnp.minimum(bound, jnp.finfo(p.dtype).max).astype(ct)
    # Below the compute dtype's smallest normal value XLA flushes the bound
    # to 0, and below a float16 tensor's smallest subnormal value the bound
    # rounds to 0 in float16; a zero bound would zero the tensor: a non-zero
    # tensor's bound is at least the larger of the two.
    nonzero = jnp.any(p != 0)
    smallest = jnp.asarray(
      max(
        float(jnp.finfo(ct).tiny), float(jnp.finfo(p.dtype).smallest_subnormal)
      ),
      ct,
    )
    return jnp.where(nonzero, jnp.maximum(bound, smallest), bound)

  return jax.tree.map(leaf, params)


def _round_down(bound: jax.Array, dtype: Any) -> jax.Array:
  """The scalar ``bound`` in ``dtype``, rounded towards zero (not to nearest).

  A float32 bound is not always representable in ``bfloat16``; rounding it
  up would let ``|w|`` exceed the bound by up to half an ulp.
  """
  bound = jnp.asarray(bound)
  if bound.dtype == dtype:
    return bound  # nothing to round (and nothing for XLA to simplify away)
  rounded = lax.convert_element_type(bound, dtype)
  up = lax.gt(
    lax.abs(lax.convert_element_type(rounded, bound.dtype)), lax.abs(bound)
  )
  return lax.select(up, numerics.step_away_from(rounded, rounded), rounded)


def abstract_bound(p: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The shape, dtype and sharding of the bound of a tensor known by shape."""
  return jax.eval_shape(initial_max_magnitude, p)


ABSTRACT_BOUNDS = (
  "{transform}: the state's weight bounds are abstract "
  "(jax.ShapeDtypeStruct): the state was initialised from shapes, and each "
  "bound, p_scale * RMS(w0), needs the initial weights' values. Initialise "
  "it with `tx.init(params)` on arrays (under jax.jit with out_shardings "
  "from madam_optax.state_shardings for sharded parameters), or restore it "
  "from a checkpoint using this state as the target."
)


def check_bounds_concrete(bounds: Any, transform: str) -> None:
  """A ``ValueError`` if a state's bounds are abstract (init from shapes)."""
  if any(tree_utils.is_abstract(b) for b in jax.tree.leaves(bounds)):
    raise ValueError(ABSTRACT_BOUNDS.format(transform=transform))


def _fixed_bound(max_magnitude: Any, p: Any) -> jax.Array:
  """``max_magnitude`` as the bound of tensor ``p``, in its compute dtype."""
  return jnp.asarray(
    max_magnitude, numerics.compute_dtype(validation.leaf_dtype(p))
  )


def current_bounds(
  state: ClipWeightMagnitudeState, params: Any, max_magnitude: Any
) -> tuple[Any, ...]:
  """The per-tensor bounds an update of :func:`clip_weight_magnitude` uses.

  The state's bounds, or, with a fixed ``max_magnitude``, its current value
  (so that a change under ``optax.inject_hyperparams`` takes effect; the
  ``p_scale`` bound is fixed from the initial weights).
  """
  if max_magnitude is None:
    bounds = tree_utils.per_tensor_tuple(state.max_magnitude)
    check_bounds_concrete(bounds, "clip_weight_magnitude")
    return bounds
  return tree_utils.per_tensor_tuple(
    jax.tree.map(lambda p: _fixed_bound(max_magnitude, p), params)
  )


def bounded_update(u: jax.Array, w: jax.Array, bound: jax.Array) -> jax.Array:
  """:func:`clip_weight_magnitude` on one tensor: the update after the clamp.

  ``clamp(w + u, -bound, bound) - w`` in ``result_type(w, u)``, such that
  ``w + delta`` stays within the bound exactly, and a weight far above the
  bound lands one ulp of ``w`` from zero rather than on it
  (:func:`numerics.update_reaching`). ``bound`` is a scalar, rounded towards
  zero into that dtype.
  """
  dtype = jnp.result_type(w, u)
  w_ = lax.convert_element_type(w, dtype)
  # The bound in the array's shape and, under explicit sharding, its
  # sharding (selects, and the derivative rules of jax.grad through init
  # and update, want both equal).
  bound = lax.full_like(w_, _round_down(bound, dtype))
  u_ = lax.convert_element_type(u, dtype)
  new = lax.add(w_, u_)
  # clamp(new, -bound, bound) by two selects: the same values as lax.clamp
  # (a NaN stays NaN), without XLA:CPU's NaN-propagating max and min, which
  # cost several instructions each.
  target = lax.select(
    lax.gt(new, bound),
    bound,
    lax.select(lax.lt(new, lax.neg(bound)), lax.neg(bound), new),
  )
  return numerics.update_reaching(w_, target)


def bounded_multiplicative_update(
  u: jax.Array,
  w: jax.Array,
  lr: jax.Array,
  bound: jax.Array,
  max_exponent: float | None = None,
) -> jax.Array:
  r"""The multiplicative step followed by the bound, on magnitudes.

  The same bits as ``bounded_update(multiplicative_step_leaf(u, w, lr,
  max_exponent), w, bound)`` for ``u`` and ``w`` of one float32 or float64
  dtype, in fewer operations. The step
  :math:`w' = w + w\,\mathrm{expm1}(-\eta\, u\, \mathrm{sign}(w))` never
  changes the sign of ``w`` (:math:`\mathrm{expm1} \ge -1`, and rounding to
  nearest is monotone and symmetric), so the clamp to :math:`[-w_{max},
  w_{max}]` and the exact landing (:func:`numerics.update_reaching`) can run
  on :math:`|w|` and :math:`|w'|` alone, with ``w``'s sign put back on the
  update at the end: the clamp is one select, the realised magnitude
  :math:`|w| + \delta` is never negative (so it needs no ``abs``), and the
  landing one ulp from zero needs no sign tests.

  Derivatives: ``|w|`` and ``sign(w)`` are taken through bit casts, which
  carry none, so the function is a ``jax.custom_jvp`` whose tangent is that
  of the two parts' plain formula, ``bounded_update(multiplicative_step_leaf(
  u, w, lr, max_exponent), w, bound)`` (the same values): ``jax.grad`` and
  ``jax.jvp`` with respect to ``u``, ``w``, ``lr`` and ``bound`` are the
  mathematical ones. A program that does not differentiate computes only
  the bits above (the compiled forward step is unchanged).
  """
  return _bounded_multiplicative_update(u, w, lr, bound, max_exponent)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _bounded_multiplicative_update(
  u: jax.Array,
  w: jax.Array,
  lr: jax.Array,
  bound: jax.Array,
  max_exponent: float | None,
) -> jax.Array:
  """:func:`bounded_multiplicative_update`'s bits (no derivative of its own)."""
  dtype = np.dtype(w.dtype)
  int_dtype = np.dtype(f"int{8 * dtype.itemsize}")
  sign_bit = np.asarray(np.iinfo(int_dtype).min, int_dtype)
  magnitude_bits = np.asarray(np.iinfo(int_dtype).max, int_dtype)
  zero = np.asarray(0, dtype)
  w_bits = lax.bitcast_convert_type(w, int_dtype)
  abs_w_bits = lax.bitwise_and(w_bits, magnitude_bits)
  abs_w = lax.bitcast_convert_type(abs_w_bits, dtype)
  # -lr * u * sign(w) with u's sign flipped by w's sign bit (w != 0).
  exponent = lax.mul(
    lax.neg(lax.convert_element_type(lr, dtype)), numerics.with_sign_of(u, w)
  )
  step = lax.mul(abs_w, numerics.expm1(exponent, max_abs=max_exponent))
  # A zero weight gets a zero update (its step may be NaN: 0 * NaN). The
  # select also keeps the step's product and the sum below rounded apart, as
  # in the two parts (with nothing between them, XLA:CPU contracts them into
  # a fused multiply-add, which rounds once: other bits).
  step = lax.select(lax.eq(abs_w, lax.full_like(abs_w, zero)), abs_w, step)
  new = lax.add(abs_w, step)  # >= 0, or NaN
  bound = lax.full_like(abs_w, _round_down(bound, dtype))
  target = lax.select(lax.gt(new, bound), bound, new)
  # numerics.update_reaching on magnitudes: a realised magnitude beyond the
  # target moves delta one ulp towards -inf (realised >= 0).
  delta = lax.sub(target, abs_w)
  realised = lax.add(abs_w, delta)
  delta_bits = lax.bitcast_convert_type(delta, int_dtype)
  nudged = lax.sub(
    delta_bits,
    lax.bitwise_or(
      lax.shift_right_arithmetic(
        delta_bits, np.asarray(8 * dtype.itemsize - 1, int_dtype)
      ),
      np.asarray(1, int_dtype),
    ),
  )
  delta = lax.select(
    lax.gt(realised, target), lax.bitcast_convert_type(nudged, dtype), delta
  )
  # numerics.land_on_the_side_of: a positive target that |w| + delta
  # misses (0, or NaN from an infinite w) lands one ulp of |w| above zero:
  # delta = -(|w| one ulp nearer to zero). A positive target means w != 0.
  lost = lax.bitwise_and(
    lax.gt(target, lax.full_like(target, zero)),
    lax.bitwise_not(lax.gt(lax.add(abs_w, delta), lax.full_like(delta, zero))),
  )
  one_ulp = lax.bitcast_convert_type(
    lax.bitwise_or(lax.sub(abs_w_bits, np.asarray(1, int_dtype)), sign_bit),
    dtype,
  )
  delta = lax.select(lost, one_ulp, delta)
  # w's sign back on by its sign bit (an integer operation: a subnormal
  # delta keeps its bits, as update_reaching's nudges do), except that a
  # target equal to |w| gives +0, as target - w does (x - x is +0).
  signed = numerics.with_sign_of(delta, w)
  return lax.select(lax.eq(target, abs_w), lax.full_like(delta, zero), signed)


@_bounded_multiplicative_update.defjvp
def _bounded_multiplicative_update_jvp(max_exponent, primals, tangents):
  """The bits as the primal; the plain formula's derivative as the tangent."""

  def plain(u, w, lr, bound):
    delta = multiplicative_step.multiplicative_step_leaf(u, w, lr, max_exponent)
    return bounded_update(delta, w, bound)

  _, tangent = jax.jvp(plain, primals, tangents)
  return _bounded_multiplicative_update(*primals, max_exponent), tangent


ZERO_LEAVES_MESSAGE = "all-zero parameter leaves at init"


def warn_on_zero_leaves(params: Any, transform: str) -> None:
  """Warns once, naming the parameter leaves that are all zero.

  A multiplicative update never moves a zero weight, so such a leaf (a Flax
  model's default bias) would silently never train. Only when run eagerly:
  under ``jax.jit`` or ``jax.eval_shape`` the values are not known and
  nothing is checked. Empty leaves and ``optax.MaskedNode`` leaves (another
  transform's) are skipped. The check is one reduction per leaf and one
  transfer of a boolean per leaf to the host.
  """
  paths, leaves = [], []
  for path, p in jax.tree_util.tree_leaves_with_path(
    params, is_leaf=tree_utils.is_masked
  ):
    if tree_utils.is_masked(p) or p is None:
      continue
    if isinstance(p, jax.core.Tracer) or tree_utils.is_abstract(p):
      return  # traced or abstract: values unknown
    p = jnp.asarray(p)
    if p.size == 0 or not p.is_fully_addressable:
      continue
    paths.append(jax.tree_util.keystr(path))
    leaves.append(p)
  if not leaves:
    return
  # Concrete leaves inside a trace (closed over by a jitted function) are
  # checked too, on their values rather than as traced operations.
  with jax.ensure_compile_time_eval():
    zero = np.asarray(jnp.stack([jnp.all(p == 0) for p in leaves]))
  named = [path or "<the parameter array>" for path, z in zip(paths, zero) if z]
  if not named:
    return
  warnings.warn(
    f"{transform}: {ZERO_LEAVES_MESSAGE} {', '.join(named)}: a "
    "multiplicative update never moves a zero weight, so these leaves will "
    "never train. Route them to an additive optimizer with "
    "madam_optax.with_additive_fallback(params, madam_optax.madam()), or "
    "initialise them away from zero. To silence this, pass "
    "warn_zero_leaves=False, or filter it: warnings.filterwarnings("
    f"'ignore', message='.*{ZERO_LEAVES_MESSAGE}').",
    UserWarning,
    stacklevel=3,
  )


def clip_weight_magnitude(
  p_scale: float = 3.0,
  *,
  max_magnitude: float | None = None,
  warn_zero_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps every weight within a per-tensor magnitude bound.

  At ``init`` each tensor's bound is fixed from the initial weights :math:`w_0`:

  .. math::

    w_{max} = p_{scale} \sqrt{\mathrm{mean}(w_0^2)},

  or ``max_magnitude`` for every tensor if given. Each ``update`` then returns
  :math:`\mathrm{clip}(w + u, -w_{max}, w_{max}) - w`, so that after
  ``optax.apply_updates`` :math:`|w| \le w_{max}` exactly, with one exception
  that keeps a weight alive: when :math:`|w|` exceeds the bound by more than
  the dtype's precision (a factor :math:`2^8` in ``bfloat16``, :math:`2^{24}`
  in float32), the only in-bound value ``w + delta`` can reach is 0, and a
  weight that the incoming step left on its side of zero lands one ulp of
  :math:`w` from zero instead (a zeroed weight would never move again); each
  such step divides :math:`|w|` by at least :math:`2^7` in ``bfloat16``
  (:math:`2^{23}` in float32) until the bound is reached. ``max_magnitude`` changed under
  ``optax.inject_hyperparams`` takes effect at the next step; ``p_scale``
  acts at ``init`` only. These are steps 1 and 7 of
  Madam (Algorithm 1 of the paper; the README's maths table). Computing the
  bound is a reduction (a collective when the tensor is
  sharded) done once at ``init``; the update itself is elementwise.

  Args:
    p_scale: multiple of each tensor's initial RMS allowed as its bound (the
      paper used 3 for CIFAR-10, ImageNet and the GAN, 1 for CIFAR-100, 2 for
      the Transformer).
    max_magnitude: a fixed bound used for every tensor instead (optional).
    warn_zero_leaves: at ``init``, when run eagerly (not under ``jax.jit``
      or ``jax.eval_shape``), warn once (a ``UserWarning``) naming the
      parameter leaves that are all zero, which a multiplicative update
      never moves, and the fix (:func:`madam_optax.with_additive_fallback`).
      ``False`` silences it; so does a standard filter,
      ``warnings.filterwarnings('ignore', message='.*all-zero parameter
      leaves at init')``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.clip_weight_magnitude(p_scale=1.0)
    >>> params = {'w': jnp.array([3.0, -4.0])}     # RMS 3.5355
    >>> u, _ = tx.update({'w': jnp.array([5.0, -5.0])}, tx.init(params), params)
    >>> optax.apply_updates(params, u)['w']
    Array([ 3.535534, -3.535534], dtype=float32)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  validation.check_hyperparameter(
    "p_scale", p_scale, low=0.0, low_inclusive=False
  )
  validation.check_hyperparameter(
    "max_magnitude",
    max_magnitude,
    low=0.0,
    low_inclusive=False,
    allow_none=True,
  )

  def init_fn(params):
    validation.check_float_leaves(params, "clip_weight_magnitude")
    if validation.concrete_value(warn_zero_leaves) != 0.0:
      warn_on_zero_leaves(params, "madam (clip_weight_magnitude)")

    def bound(path, p):
      del path
      if max_magnitude is not None:
        return _fixed_bound(max_magnitude, p)
      if tree_utils.is_abstract(p):
        return abstract_bound(p)
      return initial_max_magnitude(p, p_scale)

    return ClipWeightMagnitudeState(
      max_magnitude=tree_utils.per_tensor_tree(bound, params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    validation.require_params(params, "clip_weight_magnitude")
    updates, params = validation.as_arrays((updates, params))
    validation.check_same_structure(updates, params, "clip_weight_magnitude")
    bounds = current_bounds(state, params, max_magnitude)
    return tree_utils.map_per_tensor(
      bounded_update,
      updates,
      params,
      bounds,
      transform="clip_weight_magnitude",
      what="bounds",
    ), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
