"""Leaves Madam cannot move, and the recipe that trains them additively."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

MULTIPLICATIVE = "multiplicative"
ADDITIVE = "additive"


def _is_variable(x: Any) -> bool:
  """Array wrappers such as Flax NNX ``Variable``s (duck-typed: no Flax import)."""
  return hasattr(x, "get_value") and hasattr(x, "set_value")


def multiplicative_labels(params: Any, *, min_ndim: int = 0) -> Any:
  """Labels each leaf ``"multiplicative"`` or ``"additive"`` for ``optax.partition``.

  Madam multiplies weights, so a weight never changes sign and a zero weight
  never moves. A leaf whose entries are all zero at initialisation (Flax's
  default biases and normalisation offsets) is labelled ``"additive"``; so is
  any leaf with fewer than ``min_ndim`` dimensions (``min_ndim=2`` sends every
  bias and norm scale to the additive optimizer, which also lets them change
  sign). Everything else is ``"multiplicative"``, and so is every integer
  leaf (LNS codes for :func:`madam_optax.lns_madam`, whatever their values or
  ``ndim``): an additive optimizer's float updates to integer parameters
  would be truncated by ``optax.apply_updates`` without a word.

  The labels are computed once from concrete initial parameters, outside
  ``jit``; pass the resulting tree to ``optax.partition``. A Flax NNX state
  (``nnx.state(model, nnx.Param)``) can be passed directly: each ``Variable``
  gets one label, which fits both the state ``nnx.Optimizer`` initialises from
  and the plain arrays it updates.

  Args:
    params: the initial parameters (concrete arrays; ``None`` leaves allowed).
    min_ndim: leaves with fewer dimensions are labelled ``"additive"``.

  Returns:
    A pytree of strings with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> madam_optax.multiplicative_labels(
    ...     {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)})
    {'b': 'additive', 'w': 'multiplicative'}
  """

  def label(p):
    if _is_variable(p):
      p = p.get_value()
    if isinstance(p, jax.core.Tracer):
      raise ValueError(
        "multiplicative_labels needs concrete initial parameters; call it "
        "outside jax.jit, once, before building the optimizer."
      )
    if jnp.issubdtype(jnp.result_type(p), jnp.integer):
      # LNS codes: an additive optimizer's float updates would be truncated.
      return MULTIPLICATIVE
    if jnp.ndim(p) < min_ndim or not np.any(np.asarray(p)):
      return ADDITIVE
    return MULTIPLICATIVE

  return jax.tree.map(label, params, is_leaf=_is_variable)


def with_additive_fallback(
  params: Any,
  multiplicative_tx: optax.GradientTransformation,
  additive_tx: optax.GradientTransformation | None = None,
  *,
  min_ndim: int = 0,
) -> optax.GradientTransformation:
  """Trains Madam-movable leaves multiplicatively and the rest additively.

  ``optax.partition`` over :func:`multiplicative_labels`: leaves that are all
  zero at initialisation (or have fewer than ``min_ndim`` dimensions) go to
  ``additive_tx``, everything else to ``multiplicative_tx``.

  Args:
    params: the initial parameters (concrete), used only for labelling.
    multiplicative_tx: e.g. ``madam_optax.madam()``.
    additive_tx: the optimizer for the rest; default ``optax.adam(1e-3)``.
    min_ndim: see :func:`multiplicative_labels`.

  Returns:
    An ``optax.GradientTransformation`` for ``params``' structure.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> tx = madam_optax.with_additive_fallback(
    ...     params, madam_optax.madam(), optax.adam(1e-3))
    >>> state = tx.init(params)
  """
  if additive_tx is None:
    additive_tx = optax.adam(1e-3)
  labels = multiplicative_labels(params, min_ndim=min_ndim)
  # Passed as a function: ``optax.partition`` calls a callable labels tree,
  # and an Equinox model (so its tree of labels) is callable.
  return optax.partition(
    {MULTIPLICATIVE: multiplicative_tx, ADDITIVE: additive_tx}, lambda _: labels
  )
