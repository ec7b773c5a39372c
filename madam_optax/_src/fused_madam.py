"""Madam in one pass per tensor: the chain of its four parts, fused.

``madam()`` computes ``optax.chain(scale_by_second_moment, optax.clip,
multiplicative_step, clip_weight_magnitude)`` with the chain's own state, but
walks the parameter tree once and, for each tensor, emits one element-wise
computation that reads ``w``, ``g`` and the second moment and writes the new
second moment and the update. The numbers are the chain's (the tests hold the
two to each other leaf for leaf, bit for bit); what is saved is work the
chain repeats across its parts: validating and flattening the tree four
times, converting dtypes back and forth, computing ``w + u`` and ``- w``
twice, and, when the step is known at trace time to stay within a factor of
two, the general branches of ``expm1``, ``sign`` and the one-ulp correction.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import multiplicative_step as multiplicative_step_lib
from madam_optax._src import numerics
from madam_optax._src import second_moment
from madam_optax._src import tree_utils
from madam_optax._src import validation
from madam_optax._src.magnitude_bound import clip_weight_magnitude

_NAME = "madam"


def _broadcast(scalar: jax.Array, like: jax.Array) -> jax.Array:
  """``scalar`` in the shape (and, under explicit sharding, sharding) of ``like``."""
  return lax.full_like(like, scalar)


def _chain_leaf(g, r, w, bound, lr, moment, g_bound):
  """The chain's operations on one tensor, in its order and dtypes.

  ``moment`` is :func:`second_moment.moment_scalars` in ``g``'s compute dtype.
  """
  ct = numerics.compute_dtype(g.dtype)
  u, new_r = second_moment.normalised_gradient(
    lax.convert_element_type(g, ct), lax.convert_element_type(r, ct), *moment
  )
  u = jnp.clip(lax.convert_element_type(u, g.dtype), -g_bound, g_bound)
  wt = numerics.compute_dtype(w.dtype)
  step = lax.convert_element_type(
    multiplicative_step_lib.multiplicative_update(
      lax.convert_element_type(u, wt),
      lax.convert_element_type(w, wt),
      lax.convert_element_type(lr, wt),
    ),
    w.dtype,
  )
  # clip_weight_magnitude: clamp w + step to the bound and return the change,
  # one ulp smaller where w + change would round outside the bound.
  dtype = jnp.result_type(w, step)
  w_ = lax.convert_element_type(w, dtype)
  bound = lax.convert_element_type(bound, dtype)
  delta = lax.sub(
    lax.clamp(
      lax.neg(bound), lax.add(w_, lax.convert_element_type(step, dtype)), bound
    ),
    w_,
  )
  realised = lax.add(w_, delta)
  over = lax.gt(lax.abs(realised), bound)
  delta = lax.select(over, numerics.step_away_from(delta, realised), delta)
  return delta, lax.convert_element_type(new_r, r.dtype)


def _short_step_leaf(
  g, r, w, bound, lr, moment, g_bound: float, max_exponent: float
):
  r"""The chain's numbers when :math:`|\eta\, g_{bound}|` is small (see below).

  For ``g`` and ``w`` of one float32/float64 dtype and
  :math:`|x| = |\eta\, u| \le` ``max_exponent`` :math:`<` ``ln(2) / 2``
  (known at trace time):

  * ``expm1`` needs no range reduction (:func:`numerics.expm1` is then bit
    for bit the same);
  * :math:`x\,\mathrm{sign}(w)` is :math:`x` with ``w``'s sign bit (they
    differ only for ``w = 0``, whose new value is 0 either way);
  * the new weight :math:`w + w\,\mathrm{expm1}(x)` is within a factor of
    two of ``w``, so ``new - w`` is exact unless the clamp cut it to a bound
    below :math:`|w|/2`, and then the sum can only round outward: the
    correction is always one ulp *more* change.
  """
  dtype = w.dtype
  u, new_r = second_moment.normalised_gradient(
    g, lax.convert_element_type(r, dtype), *moment
  )
  gb = np.asarray(g_bound, dtype)
  u = lax.clamp(np.asarray(-g_bound, dtype), u, gb)
  x = numerics.with_sign_of(lax.mul(lax.neg(lr), u), w)
  new = lax.add(w, lax.mul(w, numerics.expm1(x, max_abs=max_exponent)))
  bound = lax.convert_element_type(bound, dtype)
  upper, lower = _broadcast(bound, w), _broadcast(lax.neg(bound), w)
  new = lax.select(
    lax.gt(new, upper), upper, lax.select(lax.lt(new, lower), lower, new)
  )
  delta = lax.sub(new, w)
  over = lax.gt(lax.abs(lax.add(w, delta)), bound)
  delta = lax.select(over, numerics.grow_by_one_ulp(delta), delta)
  return delta, lax.convert_element_type(new_r, r.dtype)


# Each tensor's computation is a nested jit: tensors of one shape and dtype
# (GPT-2's twelve blocks, ResNet's repeated convolutions) are traced and
# lowered once, which cuts the lowering time of many-leaf trees by half or
# more; XLA inlines the calls, so the compiled step is the same.
_chain_leaf_static_bound = jax.jit(_chain_leaf, static_argnames="g_bound")
_chain_leaf_array_bound = jax.jit(_chain_leaf)
_short_step = jax.jit(
  _short_step_leaf, static_argnames=("g_bound", "max_exponent")
)


def fused_madam(
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  p_scale: float = 3.0,
  g_bound: float = 10.0,
  b2: float = 0.999,
  state_dtype: Any = None,
  max_magnitude: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Madam's four parts as one transform with one pass per tensor.

  The same transform as ``optax.chain(scale_by_second_moment(b2,
  state_dtype=state_dtype), optax.clip(g_bound),
  multiplicative_step(learning_rate), clip_weight_magnitude(p_scale,
  max_magnitude=max_magnitude))``: the same state (``init`` is the chain's),
  the same updates and second moments, bit for bit. When the learning rate
  and ``g_bound`` are numbers with :math:`\eta\, g_{bound} \le 0.34` (the
  defaults give 0.1), every step changes :math:`\log|w|` by less than
  :math:`\ln(2)/2`, which lets the per-element work drop the general cases
  of ``expm1``, ``sign`` and the bound's one-ulp correction; with a schedule
  or a larger step each tensor runs the chain's operations as they are.
  :func:`madam_optax.madam` returns this transform.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    p_scale: per-tensor weight bound as a multiple of the initial RMS.
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average, in ``[0, 1)``.
    state_dtype: dtype of the second-moment buffer.
    max_magnitude: a fixed weight bound for every tensor.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.madam()
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> u, _ = tx.update({'w': jnp.array([3.0, 3.0])}, tx.init(params), params)
    >>> new = optax.apply_updates(params, u)['w']       # e^-0.01, -2 e^0.01
    >>> print([round(float(x), 5) for x in new])
    [0.99005, -2.0201]

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  chain = optax.chain(
    second_moment.scale_by_second_moment(b2, state_dtype=state_dtype),
    optax.clip(g_bound),
    multiplicative_step_lib.multiplicative_step(learning_rate),
    clip_weight_magnitude(p_scale, max_magnitude=max_magnitude),
  )
  lr_value = validation.concrete_value(learning_rate)
  g_bound_value = validation.concrete_value(g_bound)
  max_exponent = None
  if lr_value is not None and g_bound_value is not None:
    # |x| = |lr * u| <= lr * g_bound; the margin covers rounding lr and x.
    max_exponent = abs(lr_value) * g_bound_value
    if max_exponent > numerics.REDUCTION_FREE_EXPM1:
      max_exponent = None

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    moment_state, clip_state, step_state, bound_state = state
    validation.check_float_leaves(updates, _NAME, "updates")
    validation.check_same_structure(
      updates, moment_state.rms, _NAME, "optimizer-state"
    )
    validation.require_params(params, _NAME)
    validation.check_same_structure(updates, params, _NAME)
    validation.check_float_leaves(params, _NAME)

    count = optax.safe_increment(moment_state.count)
    lr = jnp.asarray(
      multiplicative_step_lib.learning_rate_at(learning_rate, step_state.count)
    )
    params_leaves, treedef = jax.tree.flatten(
      params, is_leaf=tree_utils.is_masked
    )
    bounds = tuple(bound_state.max_magnitude)
    if len(bounds) != len(params_leaves):
      raise ValueError(
        f"{_NAME}: the state holds {len(bounds)} bounds but params have "
        f"{len(params_leaves)} tensors. Initialise the state with "
        "`tx.init(params)` on the same parameter tree."
      )
    scalars = {}  # moment_scalars per compute dtype, traced once each
    lr_cache = {}

    def leaf(g, r, w, bound):
      if tree_utils.is_masked(g):
        return g, r
      ct = numerics.compute_dtype(g.dtype)
      if ct not in scalars:
        scalars[ct] = second_moment.moment_scalars(b2, count, ct)
      if max_exponent is None or not g.dtype == w.dtype == ct:
        if isinstance(g_bound, (int, float, np.number)):
          return _chain_leaf_static_bound(
            g, r, w, bound, lr, scalars[ct], g_bound=g_bound
          )
        return _chain_leaf_array_bound(g, r, w, bound, lr, scalars[ct], g_bound)
      if ct not in lr_cache:
        lr_cache[ct] = lax.convert_element_type(lr, ct)
      return _short_step(
        g,
        r,
        w,
        bound,
        lr_cache[ct],
        scalars[ct],
        g_bound=g_bound_value,
        max_exponent=max_exponent,
      )

    rows = zip(
      treedef.flatten_up_to(updates),
      treedef.flatten_up_to(moment_state.rms),
      params_leaves,
      bounds,
    )
    outs = [leaf(*row) for row in rows]
    new_updates = treedef.unflatten([o[0] for o in outs])
    new_rms = treedef.unflatten([o[1] for o in outs])
    new_state = (
      moment_state._replace(count=count, rms=new_rms),
      clip_state,
      step_state._replace(count=optax.safe_increment(step_state.count)),
      bound_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
