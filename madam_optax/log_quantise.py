"""Log-quantisation: projects float weights onto the LNS grid (SPEC §2, float form)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from madam_optax import _checks
from madam_optax import lns_format

ROUNDINGS = ("nearest", "stochastic")


class LogQuantiseState(NamedTuple):
  """State of :func:`log_quantise`.

  Attributes:
    scale: a tuple with one float32 scalar per parameter tensor, in
      ``jax.tree.leaves(params)`` order: the grid's largest magnitude
      :math:`w_{max}`, fixed at ``init``. A flat tuple rather than a tree
      shaped like ``params``, so that wrappers which attach per-tensor
      metadata to the parameter tree (Flax NNX's sharding annotations on
      ``nnx.Param``) do not give a scalar its tensor's sharding.
    key: the PRNG key for stochastic rounding (carried, unused, by ``nearest``).
  """
  scale: Any
  key: jax.Array


def check_rounding(rounding: str) -> None:
  """Raises ``ValueError`` unless ``rounding`` is ``nearest`` or ``stochastic``."""
  if rounding not in ROUNDINGS:
    raise ValueError(
        f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")


def round_levels(x: jax.Array, rounding: str, key: jax.Array | None) -> jax.Array:
  r"""Rounds float level counts to integers (still float dtype).

  ``nearest`` rounds half to even; ``stochastic`` returns
  :math:`\lfloor x + U \rfloor` with :math:`U \sim \mathrm{Uniform}[0, 1)`,
  which equals :math:`\lceil x \rceil` with probability
  :math:`x - \lfloor x \rfloor`, so its expectation is exactly :math:`x`.
  """
  if rounding == "nearest":
    return jnp.round(x)
  return jnp.floor(x + jax.random.uniform(key, jnp.shape(x), x.dtype))


def leaf_keys(key: jax.Array, tree: Any) -> tuple[jax.Array, Any]:
  """Splits ``key`` into a carried key and one key per leaf of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves) + 1)
  return keys[0], treedef.unflatten(list(keys[1:]))


def project_to_grid(x: jax.Array, scale, fmt: lns_format.LNSFormat,
                    rounding: str = "nearest",
                    key: jax.Array | None = None) -> jax.Array:
  r"""The LNS grid point for each entry of ``x`` (same dtype; 0 stays 0).

  The level :math:`\log(scale/|x|)/\log(base)` is rounded (to nearest, or
  stochastically and unbiased in the level) and clamped to
  ``0 .. levels-1``; the sign of ``x`` is kept.
  """
  level = lns_format.lns_level(x, scale, fmt)
  level = jnp.where(x == 0, fmt.levels - 1, level)   # finite for the rounding
  k = jnp.clip(round_levels(level, rounding, key), 0, fmt.levels - 1)
  codes = (jnp.sign(x) * (fmt.levels - k)).astype(jnp.int32)
  return lns_format.lns_decode(codes, scale, fmt, x.dtype)


def log_quantise(
    fmt: lns_format.LNSFormat,
    *,
    rounding: str = "nearest",
    seed: int = 0,
    p_scale: float = 3.0,
    max_magnitude: float | None = None,
) -> optax.GradientTransformation:
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
  per tensor at ``init`` as ``p_scale * sqrt(mean(w0**2))`` (SPEC step 1) or
  ``max_magnitude``. This is the fourth composable part of Madam (SPEC §2):
  put it last in a chain, e.g. after ``madam`` or after ``optax.adam`` to
  project another optimizer's weights onto the same grid. Stochastic rounding
  keeps its PRNG key in the state. Float round-off in ``optax.apply_updates``
  (``w + (w' - w)``) can leave the result a few ulps from the grid point.

  Args:
    fmt: the :class:`madam_optax.LNSFormat` (levels and base).
    rounding: ``"nearest"`` (deterministic) or ``"stochastic"``.
    seed: seed of the PRNG key kept in the state.
    p_scale: each tensor's :math:`w_{max}` as a multiple of its initial RMS.
    max_magnitude: a fixed :math:`w_{max}` for every tensor instead.

  Returns:
    An ``optax.GradientTransformation``; ``update`` requires ``params``.

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
  lns_format.check_format(fmt)
  check_rounding(rounding)
  _checks.check_hyperparameter("p_scale", p_scale, low=0.0, low_inclusive=False)
  _checks.check_hyperparameter("max_magnitude", max_magnitude, low=0.0,
                               low_inclusive=False, allow_none=True)

  def init_fn(params):
    _checks.check_float_leaves(params, "log_quantise")
    scales = []
    for path, p in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=_checks.is_masked)[0]:
      if _checks.is_masked(p):
        scales.append(p)
        continue
      s = (lns_format.lns_scale(p, p_scale) if max_magnitude is None
           else jnp.asarray(max_magnitude, jnp.float32))
      v = _checks.concrete_value(s)
      if v is not None and (not math.isfinite(v) or v <= 0):
        raise ValueError(
            f"log_quantise: leaf {jax.tree_util.keystr(path) or '<root>'} has "
            f"scale {v} (an all-zero tensor?); it would stay zero forever. "
            "Exclude it with `optax.masked` or train it additively "
            "(`madam_optax.with_additive_fallback`).")
      scales.append(s)
    return LogQuantiseState(scale=tuple(scales), key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    _checks.require_params(params, "log_quantise")
    _checks.check_same_structure(updates, params, "log_quantise")
    _checks.check_float_leaves(params, "log_quantise")
    scales = tuple(state.scale)
    keys = jax.random.split(state.key, len(scales) + 1)
    key, keys = keys[0], keys[1:]

    def leaf(u, w, scale, k):
      x = w + u.astype(w.dtype)
      return project_to_grid(x, scale, fmt, rounding, k) - w

    new_updates = _checks.map_per_tensor(
        leaf, updates, params, scales, keys, transform="log_quantise",
        what="scales")
    return new_updates, LogQuantiseState(
        scale=state.scale, key=key)

  return optax.GradientTransformation(init_fn, update_fn)
