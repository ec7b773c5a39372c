"""Second-moment normalisation: steps 2-4 of Madam (Adam's denominator, no epsilon)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
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

  count: jax.Array  # type: ignore[assignment]
  rms: Any


def moment_scalars(
  b2: Any, count: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""``(sqrt(b2), sqrt(1 - b2), sqrt(1 - b2**t))`` in ``dtype``, at step ``t``.

  The last is the bias correction applied to the root. At :math:`t = 1` it is
  the very same float as ``sqrt(1 - b2)``, which makes the first update
  exactly ``sign(g)`` (numerator and denominator then round alike). Computed
  in the parameters' compute dtype, so that float64 parameters get a float64
  correction.
  """
  b2_ = jnp.asarray(b2, dtype)
  sqrt_b2 = jnp.sqrt(b2_)
  sqrt_1mb2 = jnp.sqrt(1.0 - b2_)
  correction = jnp.where(
    count == 1, sqrt_1mb2, jnp.sqrt(1.0 - b2_ ** count.astype(dtype))
  )
  return sqrt_b2, sqrt_1mb2, correction


def updated_root(
  g: jax.Array, rms: jax.Array, sqrt_b2: jax.Array, sqrt_1mb2: jax.Array
) -> jax.Array:
  r""":math:`rms_t = \sqrt{\beta_2 rms^2 + (1 - \beta_2) g^2}`, element-wise.

  By a power-of-two-scaled root of squares (:func:`numerics.hypot`), so that
  tiny and huge gradients neither underflow nor overflow. ``g`` and ``rms``
  share one float32/float64 dtype; the scalars come from
  :func:`moment_scalars` in that dtype.
  """
  ct = g.dtype
  return numerics.hypot(
    lax.mul(lax.convert_element_type(sqrt_b2, ct), rms),
    lax.mul(lax.convert_element_type(sqrt_1mb2, ct), g),
  )


def divided_by_root(
  g: jax.Array, root: jax.Array, correction: jax.Array
) -> jax.Array:
  r""":math:`g \sqrt{1 - \beta_2^t} / rms_t` with :math:`0/0 := 0`.

  ``g / sqrt(v_hat)``: ``root`` is :math:`rms_t` from :func:`updated_root`
  and ``correction`` the last of :func:`moment_scalars`, in ``g``'s dtype.
  """
  ct = g.dtype
  u = lax.div(lax.mul(g, lax.convert_element_type(correction, ct)), root)
  zero = np.asarray(0, ct)
  return lax.select(lax.gt(root, zero), u, lax.full_like(u, zero))


def second_moment_leaf(
  g: jax.Array,
  rms: jax.Array,
  sqrt_b2: jax.Array,
  sqrt_1mb2: jax.Array,
  correction: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """:func:`scale_by_second_moment` on one tensor: ``(u, new_rms)``.

  ``u`` in ``g``'s dtype and ``new_rms`` in ``rms``'s; the maths runs in
  their compute dtype (:func:`numerics.compute_dtype` of ``g``), with the
  scalars of :func:`moment_scalars` in that dtype. A non-finite gradient
  entry gives a NaN ``u`` (under jit XLA's max/min may drop a NaN, so it is
  set here) and keeps its ``rms`` entry, so that later finite steps are
  normalised as before. ``u`` is divided by the kept root: for a finite
  gradient that is the new root itself, and a non-finite one gives NaN
  either way; so the compiled step reads the new root it has written
  rather than recomputing it from the old one (which would force a copy of
  the donated buffer). A state narrower than the compute dtype (bfloat16)
  is the exception: there the new state is computed a second time, from the
  old one, ordered after ``u`` (the same numbers, in two loops instead of
  three, with no compute-dtype root written to memory).
  """
  ct = numerics.compute_dtype(g.dtype)
  g_ = lax.convert_element_type(g, ct)
  finite = lax.is_finite(g_)

  def new_root(rms):
    r_ = lax.convert_element_type(rms, ct)
    return lax.select(finite, updated_root(g_, r_, sqrt_b2, sqrt_1mb2), r_)

  new_r = new_root(rms)
  u = divided_by_root(g_, new_r, correction)
  u = lax.select(finite, u, lax.full_like(u, np.nan))
  u = lax.convert_element_type(u, g.dtype)
  if np.dtype(rms.dtype) != np.dtype(ct):
    # A narrower state (bfloat16): u needs the root in ct, the state only
    # its rounding. Computed together, XLA:CPU writes the ct root to memory
    # and reads it back in two more loops. Computing the new state again
    # from the old one, after u (the barrier orders the two), gives the same
    # numbers in two loops, each reading the old state and the gradient.
    u, rms = lax.optimization_barrier((u, rms))
    new_r = new_root(rms)
  return u, lax.convert_element_type(new_r, rms.dtype)


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
  scale invariance. A non-finite gradient entry (NaN or inf) gives a NaN
  update and leaves that entry's second moment unchanged, so one bad step
  does not poison the later ones (to skip such steps altogether, wrap the
  optimizer in :func:`madam_optax.apply_if_finite`).

  Args:
    b2: decay rate of the exponential moving average of squared gradients, in
      ``[0, 1)``, and not so close to 1 that it rounds to 1.0 in float32,
      the dtype it is computed in (``1 - 1e-8`` does: it is refused).
    state_dtype: dtype of the second-moment buffer. ``None`` (default) uses each
      parameter's dtype; ``jnp.bfloat16`` halves the state's memory. The maths
      always runs in at least float32. A dtype with a narrower range than a
      parameter's (float16 for float32, float32 or bfloat16 for float64) is
      refused: the statistic would overflow or underflow there.

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
  validation.check_decay_rate("b2", b2)
  state_dtype = validation.check_state_dtype(state_dtype)

  def init_fn(params):
    validation.check_float_leaves(params, "scale_by_second_moment")
    validation.check_state_dtype_range(
      params, state_dtype, "scale_by_second_moment"
    )
    rms = jax.tree.map(
      lambda p: jnp.zeros_like(
        p, dtype=state_dtype or validation.leaf_dtype(p)
      ),
      params,
    )
    return ScaleBySecondMomentState(count=jnp.zeros([], jnp.int32), rms=rms)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    del params
    updates = validation.as_arrays(updates)
    validation.check_float_leaves(updates, "scale_by_second_moment", "updates")
    validation.check_same_structure(
      updates, state.rms, "scale_by_second_moment", "optimizer-state"
    )
    count = optax.safe_increment(state.count)
    scalars = {}  # moment_scalars per compute dtype, traced once each

    def leaf(g, r):
      ct = numerics.compute_dtype(g.dtype)
      if ct not in scalars:
        scalars[ct] = moment_scalars(b2, count, ct)
      return second_moment_leaf(g, r, *scalars[ct])

    new_updates, new_rms = tree_utils.tree_map_unzip(leaf, updates, state.rms)
    return new_updates, ScaleBySecondMomentState(count=count, rms=new_rms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
