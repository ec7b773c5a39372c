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
    rms_hat: ``sqrt(v_hat)``, the root of the *bias-corrected* EMA of squared
      gradients, one entry per parameter: a weighted root mean square of the
      gradients seen so far, so it lies between their smallest and largest
      magnitude and is representable wherever they are (gradients of 1e-37
      in float32 included, and 3e38). Earlier versions held ``sqrt(v)``
      itself, under the name ``rms``; the new name makes such a state or
      checkpoint fail loudly rather than be read as the other quantity
      (``docs/checkpointing.md`` converts one).
  """

  count: jax.Array  # type: ignore[assignment]
  rms_hat: Any


def moment_scalars(
  b2: Any, count: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  r"""``(sqrt(a_t), sqrt(1 - a_t))`` in ``dtype``: the weights of the root's EMA.

  With :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2` and
  :math:`\hat v_t = v_t / (1 - \beta_2^t)`,

  .. math::

    \hat v_t = a_t \hat v_{t-1} + (1 - a_t)\, g_t^2, \qquad
    a_t = \beta_2 \frac{1 - \beta_2^{t-1}}{1 - \beta_2^t}, \qquad
    1 - a_t = \frac{1 - \beta_2}{1 - \beta_2^t}.

  At :math:`t = 1`, :math:`a_1 = 0` and :math:`1 - a_1 = 1` exactly, so
  :math:`\sqrt{\hat v_1} = |g_1|` bit for bit and the first update is exactly
  ``sign(g)``. Computed in the parameters' compute dtype, so that float64
  parameters get float64 weights.
  """
  b2_ = jnp.asarray(b2, dtype)
  t = count.astype(dtype)
  # 1 - b2**k as -expm1(k log(b2)), log(b2) = log1p(b2 - 1) (b2 - 1 exact):
  # accurate to a few ulps where 1 - b2**k cancels (k b2-steps near 1), so
  # that a_t + (1 - a_t) is 1 to rounding and the state drifts from no
  # systematic error in its weights.
  log_b2 = jnp.log1p(b2_ - 1.0)
  one_minus_b2t = -jnp.expm1(t * log_b2)
  a = lax.div(b2_ * -jnp.expm1((t - 1.0) * log_b2), one_minus_b2t)
  one_minus_a = lax.div(1.0 - b2_, one_minus_b2t)
  # Step 1 set exactly, whatever the backend's pow rounds b2**1 to.
  first = count == 1
  return (
    jnp.where(first, jnp.zeros_like(a), jnp.sqrt(a)),
    jnp.where(first, jnp.ones_like(one_minus_a), jnp.sqrt(one_minus_a)),
  )


def updated_root(
  g: jax.Array, rms_hat: jax.Array, sqrt_a: jax.Array, sqrt_1ma: jax.Array
) -> jax.Array:
  r""":math:`\sqrt{\hat v_t} = \sqrt{a_t \hat v_{t-1} + (1 - a_t) g^2}`, element-wise.

  By a power-of-two-scaled root of squares with the weights applied after
  the scaling (:func:`numerics.hypot`), so that tiny and huge gradients
  neither underflow nor overflow. ``g`` and ``rms_hat`` share one
  float32/float64 dtype; the weights come from :func:`moment_scalars` in
  that dtype. The root of finite inputs is finite: at float32's largest
  value its rounding could make it inf (and every later update 0), so it
  is held at the dtype's largest value (one ``min``; a non-finite ``g`` is
  the caller's to handle).
  """
  root = numerics.hypot(rms_hat, g, sqrt_a, sqrt_1ma)
  return lax.min(root, np.asarray(np.finfo(g.dtype).max, g.dtype))


def divided_by_root(g: jax.Array, root: jax.Array) -> jax.Array:
  r""":math:`g / \sqrt{\hat v_t}` with :math:`0/0 := 0`.

  ``root`` is :math:`\sqrt{\hat v_t}` from :func:`updated_root`, in
  ``g``'s dtype.
  """
  u = lax.div(g, root)
  zero = np.asarray(0, g.dtype)
  return lax.select(lax.gt(root, zero), u, lax.full_like(u, zero))


def second_moment_leaf(
  g: jax.Array,
  rms_hat: jax.Array,
  sqrt_a: jax.Array,
  sqrt_1ma: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """:func:`scale_by_second_moment` on one tensor: ``(u, new_rms_hat)``.

  ``u`` in ``g``'s dtype and ``new_rms_hat`` in ``rms_hat``'s; the maths runs in
  their compute dtype (:func:`numerics.compute_dtype` of ``g``), with the
  scalars of :func:`moment_scalars` in that dtype. A non-finite gradient
  entry gives a NaN ``u`` (under jit XLA's max/min may drop a NaN, so it is
  set here) and keeps its ``rms_hat`` entry, so that later finite steps are
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

  def new_root(rms_hat):
    r_ = lax.convert_element_type(rms_hat, ct)
    return lax.select(finite, updated_root(g_, r_, sqrt_a, sqrt_1ma), r_)

  new_r = new_root(rms_hat)
  u = divided_by_root(g_, new_r)
  u = lax.select(finite, u, lax.full_like(u, np.nan))
  u = lax.convert_element_type(u, g.dtype)
  if np.dtype(rms_hat.dtype) != np.dtype(ct):
    # A narrower state (bfloat16): u needs the root in ct, the state only
    # its rounding. Computed together, XLA:CPU writes the ct root to memory
    # and reads it back in two more loops. Computing the new state again
    # from the old one, after u (the barrier orders the two), gives the same
    # numbers in two loops, each reading the old state and the gradient.
    u, rms_hat = lax.optimization_barrier((u, rms_hat))
    new_r = new_root(rms_hat)
  return u, numerics.to_state_dtype(new_r, rms_hat.dtype)


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

  The state keeps :math:`\sqrt{\hat v_t}` itself (``rms_hat``), updated as
  :math:`\sqrt{a_t \hat v_{t-1} + (1 - a_t) g_t^2}` (:func:`moment_scalars`):
  a weighted root mean square of the gradients, so every normal gradient,
  from float32's smallest (1e-38) to its largest (3e38), gives a normal
  statistic and a step, where :math:`\sqrt{v_t}` itself would be
  :math:`\sqrt{1 - \beta_2}\,|g|`, below float32's normal range for
  gradients under 4e-37.

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
    rms_hat = jax.tree.map(
      lambda p: jnp.zeros_like(
        p, dtype=state_dtype or validation.leaf_dtype(p)
      ),
      params,
    )
    return ScaleBySecondMomentState(
      count=jnp.zeros([], jnp.int32), rms_hat=rms_hat
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    del params
    updates = validation.as_arrays(updates)
    validation.check_float_leaves(updates, "scale_by_second_moment", "updates")
    validation.check_same_structure(
      updates, state.rms_hat, "scale_by_second_moment", "optimizer-state"
    )
    count = optax.safe_increment(state.count)
    scalars = {}  # moment_scalars per compute dtype, traced once each

    def leaf(g, r):
      ct = numerics.compute_dtype(g.dtype)
      if ct not in scalars:
        scalars[ct] = moment_scalars(b2, count, ct)
      return second_moment_leaf(g, r, *scalars[ct])

    new_updates, new_rms_hat = tree_utils.tree_map_unzip(
      leaf, updates, state.rms_hat
    )
    return new_updates, ScaleBySecondMomentState(
      count=count, rms_hat=new_rms_hat
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
