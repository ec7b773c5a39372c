"""Adam's normalised direction without epsilon: the first moment over the root
of the second (SPEC "Beyond the paper"), Madam's optional momentum."""

from __future__ import annotations

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

_NAME = "scale_by_moments"


class ScaleByMomentsState(NamedTuple):
  """State of :func:`scale_by_moments`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    mu: the *bias-corrected* first moment :math:`\\hat m_t = m_t / (1 -
      \\beta_1^t)`, one entry per parameter (Optax's ``scale_by_adam`` keeps
      :math:`m_t` itself; keeping :math:`\\hat m_t` makes :math:`\\hat m_1 =
      g_1` exactly, see :func:`first_moment_scalars`).
    rms_hat: ``sqrt(v_hat)``, as in
      :class:`madam_optax.ScaleBySecondMomentState`.
  """

  count: jax.Array  # type: ignore[assignment]
  mu: Any
  rms_hat: Any


def first_moment_scalars(
  b1: Any, count: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  r"""``(a_t, 1 - a_t)`` in ``dtype``: the bias-corrected EMA's weights.

  With :math:`m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t` and
  :math:`\hat m_t = m_t / (1 - \beta_1^t)`,

  .. math::

    \hat m_t = a_t \hat m_{t-1} + (1 - a_t)\, g_t, \qquad
    a_t = \beta_1 \frac{1 - \beta_1^{t-1}}{1 - \beta_1^t}, \qquad
    1 - a_t = \frac{1 - \beta_1}{1 - \beta_1^t}.

  At :math:`t = 1`, :math:`a_1 = 0` and :math:`1 - a_1 = 1` exactly, so
  :math:`\hat m_1 = g_1` bit for bit (and the first step is a sign step, as
  without momentum); with :math:`\beta_1 = 0` every step has
  :math:`\hat m_t = g_t` exactly.
  """
  b1_ = jnp.asarray(b1, dtype)
  t = count.astype(dtype)
  one_minus_b1t = 1.0 - b1_**t
  a = lax.div(b1_ * (1.0 - b1_ ** (t - 1.0)), one_minus_b1t)
  one_minus_a = lax.div(1.0 - b1_, one_minus_b1t)
  # Step 1 set exactly, whatever the backend's pow rounds b1**1 to.
  first = count == 1
  return (
    jnp.where(first, jnp.zeros_like(a), a),
    jnp.where(first, jnp.ones_like(one_minus_a), one_minus_a),
  )


def updated_mean(
  g: jax.Array, mu: jax.Array, a: jax.Array, one_minus_a: jax.Array
) -> jax.Array:
  r""":math:`\hat m_t = a_t \hat m_{t-1} + (1 - a_t) g_t`, element-wise.

  ``g`` and ``mu`` share one float32/float64 dtype; the scalars come from
  :func:`first_moment_scalars` in that dtype.
  """
  ct = g.dtype
  # Formed at the scale that brings the larger of |mu|, |g| near 1 (exact
  # powers of two), so that tiny means (1e-38 in float32) do not flush to 0
  # in the products.
  scale, unscale = numerics.unit_scale(mu, g)
  mean = lax.mul(
    lax.add(
      lax.mul(lax.convert_element_type(a, ct), lax.mul(mu, scale)),
      lax.mul(lax.convert_element_type(one_minus_a, ct), lax.mul(g, scale)),
    ),
    unscale,
  )
  # A weighted mean of finite numbers is finite, but near the dtype's largest
  # value its two rounded products and their rounded sum can land beyond it
  # (inf, kept by every later step): such a mean is the largest value. Two
  # selects, so that a NaN stays NaN and a mean within range is kept as is.
  top = np.asarray(np.finfo(ct).max, ct)
  return lax.select(
    lax.gt(mean, top),
    lax.full_like(mean, top),
    lax.select(lax.lt(mean, -top), lax.full_like(mean, -top), mean),
  )


def moments_leaf(
  g: jax.Array,
  mu: jax.Array,
  rms_hat: jax.Array,
  first: tuple[jax.Array, jax.Array],
  second: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`scale_by_moments` on one tensor: ``(u, new_mu, new_rms_hat)``.

  ``first`` is :func:`first_moment_scalars` and ``second``
  :func:`second_moment.moment_scalars`, both in ``g``'s compute dtype
  (:func:`numerics.compute_dtype`). ``u`` is in ``g``'s dtype, the new
  moments in their buffers' dtypes. As in
  :func:`second_moment.second_moment_leaf`: a non-finite gradient entry
  gives a NaN ``u`` and keeps both of its moments, ``u`` is divided by the
  new root (0 where it is 0: :math:`0/0 := 0`), and a buffer narrower than
  the compute dtype (bfloat16) is computed a second time from the old one,
  after ``u``.
  """
  ct = numerics.compute_dtype(g.dtype)
  g_ = lax.convert_element_type(g, ct)
  finite = lax.is_finite(g_)
  sqrt_a, sqrt_1ma = second

  def new_mean(mu):
    m_ = lax.convert_element_type(mu, ct)
    return lax.select(finite, updated_mean(g_, m_, *first), m_)

  def new_root(rms_hat):
    r_ = lax.convert_element_type(rms_hat, ct)
    new = second_moment.updated_root(g_, r_, sqrt_a, sqrt_1ma)
    return lax.select(finite, new, r_)

  new_m, new_r = new_mean(mu), new_root(rms_hat)
  u = second_moment.divided_by_root(new_m, new_r)
  u = lax.select(finite, u, lax.full_like(u, np.nan))
  u = lax.convert_element_type(u, g.dtype)
  narrow_m = np.dtype(mu.dtype) != np.dtype(ct)
  narrow_r = np.dtype(rms_hat.dtype) != np.dtype(ct)
  if narrow_m or narrow_r:
    # As in second_moment_leaf: the narrow buffers again, after u.
    u, mu, rms_hat = lax.optimization_barrier((u, mu, rms_hat))
    if narrow_m:
      new_m = new_mean(mu)
    if narrow_r:
      new_r = new_root(rms_hat)
  return (
    u,
    numerics.to_state_dtype(new_m, mu.dtype),
    numerics.to_state_dtype(new_r, rms_hat.dtype),
  )


def check_b1(b1: Any) -> None:
  """Raises ``ValueError`` unless ``b1`` is a decay rate in ``[0, 1)``."""
  validation.check_decay_rate("b1", b1)


def scale_by_moments(
  b1: float = 0.9,
  b2: float = 0.999,
  *,
  state_dtype: Any = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces gradients by Adam's bias-corrected first moment over the root of
  the second, without epsilon.

  For each parameter, at step :math:`t = 1, 2, \dots`:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    \hat m_t = m_t / (1 - \beta_1^t),\\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
    \hat v_t = v_t / (1 - \beta_2^t), \qquad
    u_t = \hat m_t / \sqrt{\hat v_t},

  with :math:`0/0 := 0` and no epsilon. It is ``optax.scale_by_adam(b1, b2,
  eps=0)`` with :func:`madam_optax.scale_by_second_moment`'s robustness, and
  Madam's optional first moment (SPEC "Beyond the paper"): in Madam's chain
  it takes :func:`madam_optax.scale_by_second_moment`'s place. At
  :math:`t = 1`, :math:`\hat m_1 = g_1`, so :math:`u_1 =
  \mathrm{sign}(g_1)` exactly, as without momentum; with ``b1 = 0`` every
  update equals :func:`madam_optax.scale_by_second_moment`'s bit for bit
  (this part still keeps the ``mu`` buffer then; :func:`madam_optax.madam`
  with ``b1=0`` uses :func:`madam_optax.scale_by_second_moment` instead).
  Unlike :math:`g_t / \sqrt{\hat v_t}`, :math:`|u_t|` is not bounded by
  :math:`\sqrt{1/(1-\beta_2)}` alone but by
  :math:`(1-\beta_1)/\sqrt{(1-\beta_2)(1-\beta_1^2/\beta_2)}` times a
  bias-correction factor (Kingma & Ba, 2015, section 2.1); Madam's
  ``g_bound`` clip follows it.

  A non-finite gradient entry (NaN or inf) gives a NaN update and leaves both
  of that entry's moments unchanged (as in
  :func:`madam_optax.scale_by_second_moment`). ``mu`` holds :math:`\hat m_t`
  (see :class:`madam_optax.ScaleByMomentsState`), updated as
  :math:`\hat m_t = a_t \hat m_{t-1} + (1 - a_t) g_t` with
  :math:`a_t = \beta_1 (1 - \beta_1^{t-1}) / (1 - \beta_1^t)`, the same
  numbers in exact arithmetic.

  Args:
    b1: decay rate of the moving average of gradients, in ``[0, 1)``, and
      not so close to 1 that it rounds to 1.0 in float32 (refused).
    b2: decay rate of the moving average of squared gradients, as in
      :func:`madam_optax.scale_by_second_moment`.
    state_dtype: dtype of the second-moment buffer (and of ``mu`` unless
      ``mu_dtype`` is given). ``None`` (default) uses each parameter's dtype;
      ``jnp.bfloat16`` halves the state. The maths always runs in at least
      float32. A dtype with a narrower range than a parameter's is refused.
    mu_dtype: dtype of the first-moment buffer; ``None`` (default) follows
      ``state_dtype``. Its range must hold the parameter's, as the gradients'
      own magnitudes are stored there.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.scale_by_moments(b1=0.9, b2=0.999)
    >>> state = tx.init({'w': jnp.zeros(3)})
    >>> u, state = tx.update({'w': jnp.array([0.5, -2.0, 0.0])}, state)
    >>> u['w']                                   # the first step: sign(g)
    Array([ 1., -1.,  0.], dtype=float32)
    >>> u, state = tx.update({'w': jnp.array([-0.5, -2.0, 1.0])}, state)
    >>> print(u["w"].round(3))   # first: m_hat = (0.045 - 0.05) / 0.19, v_hat = 0.25
    [-0.053 -1.     0.744]

  References:
    Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    arXiv:1412.6980.

    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  check_b1(b1)
  validation.check_decay_rate("b2", b2)
  state_dtype = validation.check_state_dtype(state_dtype)
  mu_dtype = validation.check_state_dtype(mu_dtype) or state_dtype

  def init_fn(params):
    validation.check_float_leaves(params, _NAME)
    validation.check_state_dtype_range(params, state_dtype, _NAME)
    validation.check_state_dtype_range(
      params, mu_dtype, _NAME, what="first moment", argument="mu_dtype"
    )

    def zeros(dtype):
      return jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=dtype or validation.leaf_dtype(p)),
        params,
      )

    return ScaleByMomentsState(
      count=jnp.zeros([], jnp.int32),
      mu=zeros(mu_dtype),
      rms_hat=zeros(state_dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    del params
    updates = validation.as_arrays(updates)
    validation.check_float_leaves(updates, _NAME, "updates")
    validation.check_same_structure(
      updates, state.rms_hat, _NAME, "optimizer-state"
    )
    count = optax.safe_increment(state.count)
    scalars = {}  # the moments' scalars per compute dtype, traced once each

    def leaf(g, m, r):
      ct = numerics.compute_dtype(g.dtype)
      if ct not in scalars:
        scalars[ct] = (
          first_moment_scalars(b1, count, ct),
          second_moment.moment_scalars(b2, count, ct),
        )
      return moments_leaf(g, m, r, *scalars[ct])

    new_updates, new_mu, new_rms_hat = tree_utils.tree_map_unzip(
      leaf, updates, state.mu, state.rms_hat, n_out=3
    )
    return new_updates, ScaleByMomentsState(
      count=count, mu=new_mu, rms_hat=new_rms_hat
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
