"""The multiplicative exponentiated step: step 6 of Madam."""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from madam_optax._src import numerics
from madam_optax._src import validation


class MultiplicativeStepState(NamedTuple):
  """State of :func:`multiplicative_step`: the step count, for schedules."""

  count: jax.Array  # type: ignore[assignment]


def learning_rate_at(learning_rate: optax.ScalarOrSchedule, count) -> jax.Array:
  """Evaluates a float-or-schedule learning rate at the current step count.

  A schedule's value must be float32 or wider (``ValueError`` otherwise, see
  :func:`madam_optax._src.validation.check_hyperparameter_dtype`).
  """
  if not callable(learning_rate):
    return learning_rate
  value = learning_rate(count)
  validation.check_hyperparameter_dtype(
    "learning_rate (the schedule's value)", value
  )
  return value


def multiplicative_update(
  u: jax.Array, w: jax.Array, lr: jax.Array, max_exponent: float | None = None
) -> jax.Array:
  r"""``w * expm1(-lr * u * sign(w))``, element-wise, in ``w``'s dtype.

  The update :func:`multiplicative_step` returns (its new weight minus
  ``w``); ``u``, ``w`` and ``lr`` share one float32/float64 dtype. Float32
  uses :func:`numerics.expm1` (a polynomial, about the cost of one ``exp``),
  which keeps small steps as accurate as ``expm1``: the new weight is within
  0.5 ulps of the exact product for :math:`|\eta u| \le 0.1`, against 1.5
  ulps for ``w * exp(x) - w``, whose ``exp(x)`` is rounded next to 1.
  ``max_exponent``, a bound on :math:`|\eta u|` known at trace time (e.g.
  :math:`\eta\, g_{bound}` after a clip), lets ``expm1`` skip its range
  reduction; the result is the same bit for bit.
  """
  exponent = lax.mul(lax.mul(lax.neg(lr), u), lax.sign(w))
  return lax.mul(w, numerics.expm1(exponent, max_abs=max_exponent))


def multiplicative_step_leaf(
  u: jax.Array, w: jax.Array, lr: jax.Array, max_exponent: float | None = None
) -> jax.Array:
  """:func:`multiplicative_step` on one tensor: the update, in ``w``'s dtype.

  The maths runs in ``w``'s compute dtype (:func:`numerics.compute_dtype`);
  ``max_exponent`` as in :func:`multiplicative_update`. A zero weight gets a
  zero update whatever the step (``-lr * u`` can overflow to inf, and
  ``inf * sign(0)`` is NaN).
  """
  ct = numerics.compute_dtype(w.dtype)
  delta = lax.convert_element_type(
    multiplicative_update(
      lax.convert_element_type(u, ct),
      lax.convert_element_type(w, ct),
      lax.convert_element_type(lr, ct),
      max_exponent,
    ),
    w.dtype,
  )
  return lax.select(
    lax.eq(w, lax.full_like(w, 0)), lax.full_like(delta, 0), delta
  )


def multiplicative_step(
  learning_rate: optax.ScalarOrSchedule = 0.01,
) -> optax.GradientTransformationExtraArgs:
  r"""Turns normalised gradients into a multiplicative weight update.

  For a weight :math:`w` and incoming (normalised) update :math:`u`:

  .. math::

    w' = w \exp(-\eta\, u\, \mathrm{sign}(w)), \qquad
    \text{returned update} = w' - w = w\,\mathrm{expm1}(-\eta\, u\,
    \mathrm{sign}(w)),

  so that ``optax.apply_updates`` (which adds) produces :math:`w'`. Each step
  changes :math:`\log|w|` by :math:`-\eta\, u\, \mathrm{sign}(w)`: the relative
  change of every weight is at most :math:`\exp(\eta |u|) - 1`. A weight never
  changes sign, and a zero weight never moves (see
  :func:`madam_optax.multiplicative_labels` for leaves that must). ``expm1``
  keeps tiny steps exact. This is step 6 of Madam
  (Algorithm 1 of the paper; the README's maths table); ``learning_rate`` sits in
  the exponent, so it is part of this transform rather than a trailing
  ``optax.scale_by_learning_rate``.

  Limits of floating point: the returned update is :math:`w` times a small
  factor, and ``optax.apply_updates`` adds it in :math:`w`'s dtype. A float32
  weight below about ``1e-36`` cannot move (its update is a subnormal number,
  which XLA flushes to zero); a ``bfloat16`` weight moves only if the relative
  step :math:`\eta |u|` exceeds half its spacing, ``2**-9`` to ``2**-8``
  (0.002 to 0.004; ``float16``: ``2**-12`` to ``2**-11``), so small learning
  rates leave ``bfloat16`` weights unchanged: keep float32 weights (a
  bfloat16 copy for the forward pass) or use a larger rate. A non-finite
  update or learning rate gives a non-finite weight (a zero weight stays
  zero); see :func:`madam_optax.apply_if_finite` to skip such steps.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (a function of
      the step count, starting at 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.multiplicative_step(learning_rate=0.1)
    >>> params = {'w': jnp.array([2.0, -2.0])}
    >>> u, _ = tx.update({'w': jnp.array([1.0, 1.0])}, tx.init(params), params)
    >>> print(optax.apply_updates(params, u)['w'].round(4))  # 2e^-0.1, -2e^0.1
    [ 1.8097 -2.2103]

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  validation.check_hyperparameter("learning_rate", learning_rate, low=0.0)

  def init_fn(params):
    validation.check_float_leaves(params, "multiplicative_step")
    return MultiplicativeStepState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    validation.require_params(params, "multiplicative_step")
    updates, params = validation.as_arrays((updates, params))
    validation.check_same_structure(updates, params, "multiplicative_step")
    validation.check_float_leaves(params, "multiplicative_step")
    lr = jnp.asarray(learning_rate_at(learning_rate, state.count))

    new_updates = jax.tree.map(
      lambda u, w: multiplicative_step_leaf(u, w, lr), updates, params
    )
    return new_updates, MultiplicativeStepState(
      count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
