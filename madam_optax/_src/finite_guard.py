"""Skipping bad steps: ``apply_if_finite`` for every optimizer in the package."""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import optax

from madam_optax._src import validation


def _all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf is finite (integer leaves always are)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def apply_if_finite(
  inner: optax.GradientTransformation,
  max_consecutive_errors: int,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a step whose gradients hold a NaN or an infinity.

  The guard for every optimizer in this package. A step whose incoming
  updates (the gradients) contain a non-finite entry is skipped: the returned
  updates are zeros, so ``optax.apply_updates`` leaves the parameters as they
  are, and ``inner``'s state is kept unchanged (the second moment, the step
  count and the PRNG key do not advance). After more than
  ``max_consecutive_errors`` bad steps in a row the steps are applied again,
  as in ``optax.apply_if_finite``, whose state
  (``optax.ApplyIfFiniteState``: ``notfinite_count``, ``last_finite``,
  ``total_notfinite``) it shares, so the number of skipped steps can be
  logged.

  It differs from ``optax.apply_if_finite`` in one point: a skipped step
  returns zeros of the dtype ``inner`` returns, not of the gradients' dtype.
  :func:`madam_optax.lns_madam` returns integer code changes for float
  gradients, which ``optax.apply_if_finite`` cannot wrap (``lax.cond`` finds
  float zeros on one branch and ``int8`` on the other); for float
  parameters the two are the same.

  Without a guard a bad step is never silent corruption: a float weight
  whose update is not finite becomes NaN or infinite (visible in the loss),
  an LNS code keeps its value (:func:`madam_optax.lns_level_step`), and a
  non-finite gradient leaves its second-moment entry unchanged
  (:func:`madam_optax.scale_by_second_moment`). The guard makes the whole
  step a no-op instead, which is what mixed-precision loss scaling and
  occasional bad batches want.

  Args:
    inner: the optimizer to guard, e.g. ``madam_optax.madam()`` or
      ``madam_optax.lns_madam(fmt)`` (or a ``with_additive_fallback``
      partition of them).
    max_consecutive_errors: how many bad steps in a row are skipped before
      the steps are applied regardless (an int >= 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``optax.ApplyIfFiniteState``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat.spanning(127)
    >>> tx = madam_optax.apply_if_finite(madam_optax.lns_madam(fmt), 3)
    >>> codes = {'w': jnp.array([50, -50], jnp.int8)}
    >>> state = tx.init(codes)
    >>> u, state = tx.update({'w': jnp.array([jnp.nan, 1.0])}, state, codes)
    >>> u['w'], int(state.total_notfinite)
    (Array([0, 0], dtype=int8), 1)
  """
  validation.check_hyperparameter(
    "max_consecutive_errors", max_consecutive_errors, low=0.0
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True, jnp.bool_),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = state.inner_state
    finite = _all_finite(updates)
    notfinite_count = jnp.where(
      finite,
      jnp.zeros([], jnp.int32),
      optax.safe_increment(state.notfinite_count),
    )

    # The arrays go into lax.cond as operands, not closed over: run eagerly,
    # closed-over arrays would be constants of the branch, and XLA's
    # constant folding reassociates products (hypot(0, 2.6e32) came out NaN).
    updates, params = validation.as_arrays((updates, params))
    operands = (updates, inner_state, params)

    def do_update(operands):
      updates, inner_state, params = operands
      return inner.update(updates, inner_state, params, **extra_args)

    # Zeros of the inner update's own dtypes (integer for LNS codes).
    update_types, _ = jax.eval_shape(do_update, operands)

    def skip_update(operands):
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_types)
      return zeros, operands[1]

    new_updates, new_inner_state = lax.cond(
      jnp.logical_or(finite, notfinite_count > max_consecutive_errors),
      do_update,
      skip_update,
      operands,
    )
    return new_updates, optax.ApplyIfFiniteState(
      notfinite_count=notfinite_count,
      last_finite=finite,
      total_notfinite=jnp.where(
        finite,
        state.total_notfinite,
        optax.safe_increment(state.total_notfinite),
      ),
      inner_state=new_inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
