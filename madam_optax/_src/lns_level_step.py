"""The LNS level step: Madam's multiplicative step as integer code changes."""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import lns
from madam_optax._src import multiplicative_step
from madam_optax._src import numerics
from madam_optax._src import validation


class LNSLevelStepState(NamedTuple):
  """State of :func:`lns_level_step`.

  Attributes:
    count: number of updates so far (int32), for learning-rate schedules.
    key: the PRNG key for stochastic rounding (carried, unused, by ``nearest``).
  """

  count: jax.Array  # type: ignore[assignment]
  key: jax.Array


def lns_level_step(
  fmt: lns.LNSFormat,
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  rounding: str = "stochastic",
  seed: int = 0,
  rng: str = "hash",
) -> optax.GradientTransformationExtraArgs:
  r"""Turns normalised gradients into integer level changes of LNS codes.

  Madam's step :math:`\log|w| \leftarrow \log|w| - \eta\, u\, \mathrm{sign}(w)`
  (step 6 of Madam) on :math:`w = s\, w_{max}\, base^{-k}` is an additive step in
  the level :math:`k` (the paper's LNS training; the README's LNS section):

  .. math::

    k' = \mathrm{clip}\big(k + \mathrm{R}(\eta\, u\, \mathrm{sign}(w) /
         \log(base)),\ 0,\ levels - 1\big),

  with :math:`\mathrm{R}` the nearest integer (half to even) or stochastic
  rounding :math:`\lfloor x + U \rfloor` (unbiased: steps smaller than one
  level still move on average). The sign is kept, the clamp is Madam's step 7,
  and code 0 (an exact zero) never moves. ``params`` are the integer codes
  (see :class:`madam_optax.LNSFormat`); the returned updates are the integer code
  changes, of the codes' dtype, so ``optax.apply_updates`` keeps them integers.
  The per-tensor scale is not needed here: it only enters the decoding. A
  non-finite update entry (NaN or inf), or a non-finite learning rate, leaves
  its code unchanged (a code cannot hold NaN); wrap the optimizer in
  :func:`madam_optax.apply_if_finite` to skip such steps and count them.

  Args:
    fmt: the codes' :class:`madam_optax.LNSFormat`.
    learning_rate: :math:`\eta`, a float or an optax schedule.
    rounding: ``"stochastic"`` (default) or ``"nearest"``.
    seed: seed of the PRNG key kept in the state.
    rng: random bits for stochastic rounding: ``"hash"`` (default), a
      counter-based integer hash of (seed, step, tensor, element index), a
      few integer operations per weight and the same however the codes
      are sharded; or ``"threefry"`` (``jax.random``, several times the cost
      of the whole step on CPU).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires the codes as
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=100, base=1.01)
    >>> tx = madam_optax.lns_level_step(fmt, 0.03, rounding="nearest")
    >>> codes = {'w': jnp.array([50, -50, 99, 0], jnp.int8)}
    >>> u, _ = tx.update({'w': jnp.array([1.0, 1.0, -1.0, 1.0])},
    ...                  tx.init(codes), codes)
    >>> optax.apply_updates(codes, u)['w']   # 0.03 / log(1.01) = 3.01 levels
    Array([ 47, -53, 100,   0], dtype=int8)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  lns.check_format(fmt)
  lns.check_rounding(rounding)
  lns.check_random_bits(rng)
  validation.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  log_base = fmt.log_base
  lr_value = validation.concrete_value(learning_rate)

  def levels_per_unit(count):
    # Computed in float64 when the rate is a Python number, so that the
    # paper's reference step 0.01 / 0.001 is exactly 10 in float32.
    if lr_value is not None:
      return jnp.float32(lr_value / log_base)
    lr = jnp.asarray(
      multiplicative_step.learning_rate_at(learning_rate, count), jnp.float32
    )
    return lr / jnp.float32(log_base)

  def init_fn(params):
    lns.check_code_leaves(params, fmt, "lns_level_step")
    return LNSLevelStepState(
      count=jnp.zeros([], jnp.int32), key=lns.initial_key(seed, rng)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    validation.require_params(params, "lns_level_step")
    updates, params = validation.as_arrays((updates, params))
    validation.check_same_structure(updates, params, "lns_level_step")
    lns.check_code_leaves(params, fmt, "lns_level_step")
    step = levels_per_unit(state.count)
    leaves, treedef = jax.tree.flatten(params)
    if rounding == "stochastic":
      key, keys = lns.split_key(state.key, len(leaves), rng)
    else:
      key, keys = state.key, [None] * len(leaves)

    def leaf(u, c, k):
      # With m = |c| = levels - k and s = sign(c), the new code is
      # s * clip(m - dk, 1, levels), dk = R(step * u * s), and the code
      # zero never moves.
      cf = lax.convert_element_type(c, np.float32)
      m = lax.abs(cf)
      x = numerics.with_sign_of(lax.mul(step, u.astype(jnp.float32)), cf)
      dk = lns.round_levels(x, rounding, k, rng)
      change = lax.sub(
        lax.clamp(np.float32(1), lax.sub(m, dk), np.float32(fmt.levels)), m
      )
      change = lax.select(
        lax.eq(cf, np.float32(0)),
        lax.full_like(cf, 0),
        numerics.with_sign_of(change, cf),
      )
      return lax.convert_element_type(
        numerics.small_integer_to_int32(change), c.dtype
      )

    def keep_if_not_finite(u, c, k):
      # A code cannot hold NaN: a non-finite update leaves the code as it is.
      delta = leaf(u, c, k)
      finite = jnp.logical_and(jnp.isfinite(u), jnp.isfinite(step))
      return jnp.where(finite, delta, jnp.zeros_like(delta))

    new_updates = treedef.unflatten(
      [
        keep_if_not_finite(u, c, k)
        for u, c, k in zip(treedef.flatten_up_to(updates), leaves, keys)
      ]
    )
    return new_updates, LNSLevelStepState(
      count=optax.safe_increment(state.count), key=key
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
