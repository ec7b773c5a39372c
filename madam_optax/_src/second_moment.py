"""Second-moment normalisation: steps 2-4 of Madam (Adam's denominator, no epsilon)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from madam_optax._src import numerics
from madam_optax._src import tree_utils
from madam_optax._src import validation


class ScaleBySecondMomentState(NamedTuple):
  """State of :func:`scale_by_second_moment`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    rms: ``sqrt(v)``, the root of the un-bias-corrected EMA of squared
      gradients, one entry per parameter. Storing the root keeps the buffer in
      the gradients' own range, so gradients as small as 1e-20 do not underflow
      to zero when squared in float32 or bfloat16.
  """
  count: jax.Array
  rms: Any


class RootEMACoefficients(NamedTuple):
  """Scalars of one step of the root-form EMA (float32).

  Attributes:
    sqrt_b2: :math:`\\sqrt{\\beta_2}`.
    sqrt_1mb2: :math:`\\sqrt{1 - \\beta_2}`.
    correction: :math:`\\sqrt{1 - \\beta_2^t}`, the bias correction of the
      root; at :math:`t = 1` the very same float as ``sqrt_1mb2``.
  """
  sqrt_b2: jax.Array
  sqrt_1mb2: jax.Array
  correction: jax.Array


def root_ema_coefficients(b2: Any, count: jax.Array) -> RootEMACoefficients:
  """The scalars of step ``count`` (1-based) of the second moment's root EMA."""
  b2_ = jnp.asarray(b2, jnp.float32)
  sqrt_1mb2 = jnp.sqrt(1.0 - b2_)
  # Bias correction applied to the root: sqrt(1 - b2**t). At t = 1 it is
  # taken as the very same float as sqrt(1 - b2), which makes the first
  # update exactly sign(g) (the numerator and denominator then round alike).
  correction = jnp.where(
      count == 1, sqrt_1mb2, jnp.sqrt(1.0 - b2_ ** count.astype(jnp.float32)))
  return RootEMACoefficients(jnp.sqrt(b2_), sqrt_1mb2, correction)


def normalise_leaf(g: jax.Array, r: jax.Array,
                   coefficients: RootEMACoefficients
                   ) -> tuple[jax.Array, jax.Array]:
  """One tensor's step: ``(g / sqrt(v_hat), new root of v)``, 0/0 := 0.

  ``r`` is the root of the un-bias-corrected EMA of squared gradients; the
  update has ``g``'s dtype and the new root ``r``'s.
  """
  ct = numerics.compute_dtype(g.dtype)
  g_ = lax.convert_element_type(g, ct)
  sqrt_b2, sqrt_1mb2, correction = (
      lax.convert_element_type(c, ct) for c in coefficients)
  # rms_t = sqrt(b2 * rms**2 + (1 - b2) * g**2), computed without squaring
  # (hypot), so that tiny and huge gradients neither underflow nor overflow.
  new_r = numerics.hypot(lax.mul(sqrt_b2, lax.convert_element_type(r, ct)),
                         lax.mul(sqrt_1mb2, g_))
  # g / sqrt(v_hat) = g * sqrt(1 - b2**t) / rms_t, and 0/0 := 0.
  tiny = np.asarray(np.finfo(ct).tiny, ct)
  positive = lax.convert_element_type(lax.gt(new_r, np.asarray(0, ct)), ct)
  u = lax.mul(lax.div(lax.mul(g_, correction), lax.max(new_r, tiny)),
              positive)
  return (lax.convert_element_type(u, g.dtype),
          lax.convert_element_type(new_r, r.dtype))


def scale_by_second_moment(
    b2: float = 0.999,
    *,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides gradients by the root of their bias-corrected second moment.

  For each parameter, at step :math:`t = 1, 2, \dots`:

  .. math::

    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
    \hat v_t = v_t / (1 - \beta_2^t), \qquad
    u_t = g_t / \sqrt{\hat v_t},

  with :math:`0/0 := 0` (a parameter whose gradients have all been zero gets a
  zero update) and no epsilon. At :math:`t = 1`, :math:`u_1 = \mathrm{sign}(g_1)`
  exactly. These are steps 2-4 of Madam
  (Bernstein et al., 2020, Algorithm 1; the README's maths table); unlike
  ``optax.scale_by_rms`` there is no epsilon, which Madam relies on for its
  scale invariance.

  Args:
    b2: decay rate of the exponential moving average of squared gradients, in
      ``[0, 1)``.
    state_dtype: dtype of the second-moment buffer. ``None`` (default) uses each
      parameter's dtype; ``jnp.bfloat16`` halves the state's memory. The maths
      always runs in at least float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.scale_by_second_moment(b2=0.999)
    >>> g = {'w': jnp.array([0.5, -2.0, 0.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u['w']
    Array([ 1., -1.,  0.], dtype=float32)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  validation.check_hyperparameter("b2", b2, low=0.0, high=1.0, high_inclusive=False)
  state_dtype = validation.check_state_dtype(state_dtype)

  def init_fn(params):
    validation.check_float_leaves(params, "scale_by_second_moment")
    rms = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=state_dtype or p.dtype), params)
    return ScaleBySecondMomentState(
        count=jnp.zeros([], jnp.int32), rms=rms)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    del params
    validation.check_float_leaves(updates, "scale_by_second_moment", "updates")
    validation.check_same_structure(updates, state.rms, "scale_by_second_moment",
                                 "optimizer-state")
    count = optax.safe_increment(state.count)
    coefficients = root_ema_coefficients(b2, count)
    new_updates, new_rms = tree_utils.tree_map_unzip(
        lambda g, r: normalise_leaf(g, r, coefficients), updates, state.rms)
    return new_updates, ScaleBySecondMomentState(count=count, rms=new_rms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
