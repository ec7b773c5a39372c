"""Magnitude bounding: SPEC steps 1 and 7 (a per-tensor clamp on weights)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from madam_optax import _checks


class ClipWeightMagnitudeState(NamedTuple):
  """State of :func:`clip_weight_magnitude`.

  Attributes:
    max_magnitude: a tuple with one scalar per parameter tensor, in
      ``jax.tree.leaves(params)`` order (float32, or float64 for float64
      parameters): the bounds :math:`w_{max}` fixed at ``init``. A flat tuple
      rather than a tree shaped like ``params``, so that wrappers that attach
      per-tensor metadata to the parameter tree (Flax NNX's sharding
      annotations on ``nnx.Param``) do not give a scalar its tensor's sharding.
  """
  max_magnitude: Any


def initial_rms_bound(params: Any, p_scale) -> Any:
  r"""Per-tensor bound ``p_scale * sqrt(mean(w0**2))`` (SPEC step 1).

  The RMS is computed as ``m * sqrt(mean((w0 / m)**2))`` with ``m = max|w0|``,
  so it neither overflows for huge weights nor underflows for tiny ones, and
  the bound is capped at the largest finite value of the parameter's dtype.
  Each bound is a scalar in the parameter's compute dtype (float32, or float64
  for float64 parameters).
  """
  def leaf(p):
    dtype = p.dtype
    ct = _checks.compute_dtype(dtype)
    p = p.astype(ct)
    m = jnp.max(jnp.abs(p)) if p.size else jnp.zeros([], ct)
    scaled = p / jnp.where(m > 0, m, 1)
    rms = m * jnp.sqrt(jnp.mean(jnp.square(scaled))) if p.size else m
    bound = jnp.asarray(p_scale, ct) * rms
    return jnp.minimum(bound, jnp.finfo(dtype).max).astype(ct)
  return jax.tree.map(leaf, params)


def _step_away_from(x: jax.Array, reference: jax.Array) -> jax.Array:
  """One ulp of ``x`` in the direction opposite to ``reference``'s sign.

  For finite nonzero ``x`` this is ``jnp.nextafter(x, -sign(reference) * inf)``,
  the only case in which it is used (a clipped step that overshot the bound
  is never zero or infinite). Floats are sign and magnitude, so adding one to
  the bit pattern grows ``|x|`` by one ulp and subtracting one shrinks it;
  written as a handful of lax primitives, which keeps both the fused update
  and tracing cheap on many-leaf trees.
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


def clip_weight_magnitude(
    p_scale: float = 3.0,
    *,
    max_magnitude: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps every weight within a per-tensor magnitude bound.

  At ``init`` each tensor's bound is fixed from the initial weights :math:`w_0`:

  .. math::

    w_{max} = p_{scale} \sqrt{\mathrm{mean}(w_0^2)},

  or ``max_magnitude`` for every tensor if given. Each ``update`` then returns
  :math:`\mathrm{clip}(w + u, -w_{max}, w_{max}) - w`, so that after
  ``optax.apply_updates`` :math:`|w| \le w_{max}`. These are steps 1 and 7 of
  Madam. Computing the bound is a reduction (a collective when the tensor is
  sharded) done once at ``init``; the update itself is elementwise.

  Args:
    p_scale: multiple of each tensor's initial RMS allowed as its bound (the
      paper used 3 for CIFAR-10, ImageNet and the GAN, 1 for CIFAR-100, 2 for
      the Transformer).
    max_magnitude: a fixed bound used for every tensor instead (optional).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

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
  _checks.check_hyperparameter("p_scale", p_scale, low=0.0, low_inclusive=False)
  _checks.check_hyperparameter("max_magnitude", max_magnitude, low=0.0,
                               low_inclusive=False, allow_none=True)

  def init_fn(params):
    _checks.check_float_leaves(params, "clip_weight_magnitude")
    if max_magnitude is None:
      bounds = initial_rms_bound(params, p_scale)
    else:
      bounds = jax.tree.map(
          lambda p: jnp.asarray(max_magnitude, _checks.compute_dtype(p.dtype)),
          params)
    return ClipWeightMagnitudeState(
        max_magnitude=tuple(
            jax.tree.leaves(bounds, is_leaf=_checks.is_masked)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    _checks.require_params(params, "clip_weight_magnitude")
    _checks.check_same_structure(updates, params, "clip_weight_magnitude")

    def leaf(u, w, bound):
      dtype = jnp.result_type(w, u)
      w_ = lax.convert_element_type(w, dtype)
      bound = lax.convert_element_type(bound, dtype)
      delta = lax.sub(
          lax.clamp(lax.neg(bound),
                    lax.add(w_, lax.convert_element_type(u, dtype)), bound),
          w_)
      # ``optax.apply_updates`` computes ``w + delta`` in w's dtype. When |w| is
      # more than twice the bound, ``bound - w`` is rounded and the sum can
      # land one ulp outside the bound: nudge delta by one ulp towards zero
      # magnitude in that case, so that |w + delta| <= bound holds exactly.
      realised = lax.add(w_, delta)
      over = lax.gt(lax.abs(realised), bound)
      return lax.select(over, _step_away_from(delta, realised), delta)

    return _checks.map_per_tensor(
        leaf, updates, params, state.max_magnitude,
        transform="clip_weight_magnitude", what="bounds"), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
