"""Log-quantisation: projects float weights onto the LNS grid (float form)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from madam_optax._src import lns
from madam_optax._src import magnitude_bound
from madam_optax._src import numerics
from madam_optax._src import tree_utils
from madam_optax._src import validation


class LogQuantiseState(NamedTuple):
  """State of :func:`log_quantise`.

  Attributes:
    max_magnitude: a tree shaped like ``params`` with one scalar per tensor:
      the grid's largest magnitude :math:`w_{max}`, fixed at ``init`` (as in
      :class:`madam_optax.ClipWeightMagnitudeState`, whose notes on Flax NNX
      Variables, the 0.2 format and init from shapes hold here too).
    key: the PRNG key for stochastic rounding (carried, unused, by ``nearest``).
  """

  max_magnitude: Any
  key: jax.Array


def log_quantise(
  fmt: lns.LNSFormat,
  *,
  rounding: str = "nearest",
  seed: int = 0,
  p_scale: float = 3.0,
  max_magnitude: float | None = None,
  rng: str = "hash",
) -> optax.GradientTransformationExtraArgs:
  r"""Projects ``w + u`` onto the LNS grid: float params that live on the grid.

  For a float weight :math:`w` and incoming update :math:`u`, with the grid
  :math:`\{\pm w_{max}\, base^{-k} : k = 0 .. levels-1\} \cup \{0\}`:

  .. math::

    k &= \mathrm{clip}(\mathrm{R}(\log(w_{max}/|w+u|)/\log(base)),\ 0,\
         levels - 1)\\
    w' &= \mathrm{sign}(w+u)\, w_{max}\, base^{-k}, \qquad
    \text{returned update} = w' - w,

  where :math:`\mathrm{R}` rounds to nearest (half to even) or stochastically
  (:math:`\lfloor x + U\rfloor`, unbiased in the level). :math:`w_{max}` is fixed
  per tensor at ``init`` as ``p_scale * sqrt(mean(w0**2))`` (Madam's step 1) or
  ``max_magnitude``. This is the fourth composable part of Madam (the
  paper's LNS training; the README's LNS section): put it last in a chain, e.g. after ``madam`` or after ``optax.adam`` to
  project another optimizer's weights onto the same grid. Stochastic rounding
  keeps its PRNG key in the state. Float round-off in ``optax.apply_updates``
  (``w + (w' - w)``) can leave the result a few ulps from the grid point.
  Where :math:`w + u` is not finite (a NaN or infinite update) the weight is
  left as it is. A weight more than its dtype's precision above the grid
  (a factor :math:`2^8` in ``bfloat16``) cannot reach it in one additive
  step: it lands one ulp of :math:`w` from zero, with the grid point's sign
  (never on 0, from which it could not move), and each such step divides
  :math:`|w|` by at least :math:`2^7` in ``bfloat16`` until it reaches the
  grid. ``p_scale`` is read at ``init`` only; a ``max_magnitude``
  changed later (e.g. under ``optax.inject_hyperparams``) takes effect.

  Args:
    fmt: the :class:`madam_optax.LNSFormat` (levels and base).
    rounding: ``"nearest"`` (deterministic) or ``"stochastic"``.
    seed: seed of the PRNG key kept in the state.
    p_scale: each tensor's :math:`w_{max}` as a multiple of its initial RMS.
    max_magnitude: a fixed :math:`w_{max}` for every tensor instead.
    rng: random bits for stochastic rounding: ``"hash"`` (default; cheap,
      counter-based, the same however the weights are sharded) or
      ``"threefry"`` (``jax.random``); see :func:`lns_level_step`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=2.0)
    >>> tx = madam_optax.log_quantise(fmt, max_magnitude=1.0)
    >>> params = {'w': jnp.array([0.9, -0.3, 0.01, 5.0])}
    >>> u, _ = tx.update({'w': jnp.zeros(4)}, tx.init(params), params)
    >>> optax.apply_updates(params, u)['w']
    Array([ 1.   , -0.25 ,  0.125,  1.   ], dtype=float32)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  lns.check_format(fmt)
  lns.check_rounding(rounding)
  lns.check_random_bits(rng)
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
    validation.check_float_leaves(params, "log_quantise")

    def bound_of(path, p):
      if max_magnitude is not None:
        return fixed_bound()
      if tree_utils.is_abstract(p):
        return magnitude_bound.abstract_bound(p)
      bound = magnitude_bound.initial_max_magnitude(p, p_scale)
      v = validation.concrete_value(bound)
      if v is not None and (not math.isfinite(v) or v <= 0):
        raise ValueError(
          f"log_quantise: leaf {tree_utils.leaf_name(path)} has "
          f"max_magnitude {v} (an all-zero or empty tensor, or one with "
          "NaN or inf entries?); the grid needs a finite bound > 0. Exclude "
          "it with `optax.masked` or train it additively "
          "(`madam_optax.with_additive_fallback`)."
        )
      return bound

    return LogQuantiseState(
      max_magnitude=tree_utils.per_tensor_tree(bound_of, params),
      key=lns.initial_key(seed, rng),
    )

  def fixed_bound():
    return jnp.asarray(max_magnitude, jnp.float32)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    validation.require_params(params, "log_quantise")
    updates, params = validation.as_arrays((updates, params))
    validation.check_same_structure(updates, params, "log_quantise")
    validation.check_float_leaves(params, "log_quantise")
    bounds = tree_utils.per_tensor_tuple(state.max_magnitude)
    if max_magnitude is None:
      magnitude_bound.check_bounds_concrete(bounds, "log_quantise")
    key, keys = lns.split_key(state.key, len(bounds), rng)
    if max_magnitude is not None:
      # The current value, so that a change under optax.inject_hyperparams
      # takes effect (p_scale's bound is fixed from the initial weights).
      bounds = tuple(
        b if tree_utils.is_masked(b) else fixed_bound() for b in bounds
      )

    def leaf(u, w, bound, k):
      x = w + u.astype(w.dtype)
      target = lns.project_to_grid(x, bound, fmt, rounding, k, rng)
      # w + delta lands on the grid, never one ulp above its top (inf when
      # the top is the dtype's largest value), and a weight far above the
      # grid (by more than its dtype's precision) does not land on 0.
      delta = numerics.update_reaching(w, target)
      # A non-finite w + u (NaN or infinite update) leaves the weight as is.
      return jnp.where(jnp.isfinite(x), delta, jnp.zeros_like(delta))

    new_updates = tree_utils.map_per_tensor(
      leaf,
      updates,
      params,
      bounds,
      keys,
      transform="log_quantise",
      what="bounds",
    )
    return new_updates, LogQuantiseState(
      max_magnitude=state.max_magnitude, key=key
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
