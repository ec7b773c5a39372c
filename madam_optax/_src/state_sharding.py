"""The optimizer state's shardings from the parameters' (for ``jax.jit``)."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax

from madam_optax._src import factored_second_moment
from madam_optax._src import tree_utils

# statistic: the index, in factored_axes, of the axis it averages over
_FACTORED = {"row_rms_hat": 1, "col_rms_hat": 0}


class _Owner:
  """A state leaf's parameter (a leaf for ``jax.tree.map``)."""

  __slots__ = ("param",)

  def __init__(self, param: Any):
    self.param = param


_NOT_PER_PARAM = object()  # a state leaf of no parameter (a count, a key)


def _abstract(path: Any, p: Any) -> Any:
  sharding = getattr(p, "sharding", None)
  if sharding is None:
    raise ValueError(
      f"state_shardings: parameter {tree_utils.leaf_name(path)} has no "
      "sharding. Pass the parameters as jax.Arrays, or as "
      "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))."
    )
  return jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding)


def _replicated(sharding: Any, where: str) -> Any:
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  if sharding.is_fully_replicated:
    return sharding
  raise ValueError(
    f"state_shardings: {where} needs a replicated sharding, but its "
    f"parameter's {sharding} is neither replicated nor a NamedSharding. "
    "Shard the parameters with jax.sharding.NamedSharding."
  )


def _without_axis(sharding: Any, ndim: int, axis: int, where: str) -> Any:
  if not isinstance(sharding, NamedSharding):
    return _replicated(sharding, where)
  spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
  del spec[axis]
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
  r"""The sharding of every leaf of ``tx.init(params)``, from the parameters'.

  For ``jax.jit(tx.init, out_shardings=...)`` and the update's
  ``in_shardings``/``out_shardings``: a per-parameter leaf of the state (a
  second or first moment) is sharded like its parameter; a factored row or
  column statistic (:func:`madam_optax.scale_by_factored_second_moment`)
  like its parameter with the averaged axis dropped from the partition
  spec, so each statistic stays split along the dimension it keeps; a
  per-tensor scalar (a weight bound) and every other leaf (step counts,
  PRNG keys, injected hyperparameters) is replicated. With these, the
  compiled update of :func:`madam_optax.madam` (factored or not) needs no
  communication at all; a factored update has only the means of its
  statistics to reduce.

  The state's structure comes from ``jax.eval_shape(tx.init, params)`` (no
  values are read, nothing is computed) and the leaves that belong to a
  parameter from ``optax.tree.map_params``, so ``tx`` may be any
  composition of madam-optax and Optax transforms that ``map_params``
  understands (``optax.chain``, ``optax.inject_hyperparams``,
  :func:`madam_optax.with_additive_fallback`). Plain ``map_params`` with the
  parameters' specs gets the per-tensor scalars and factored statistics
  wrong (it gives them the parameter's spec, of another rank); this
  function is that call with those two cases right.

  Args:
    tx: the optimizer.
    params: the parameters (``jax.Array``\ s) or their
      ``jax.ShapeDtypeStruct``\ s, each with a ``sharding`` (a
      ``jax.sharding.NamedSharding``; a fully replicated sharding of another
      kind is kept as it is).

  Returns:
    A tree with the structure of ``tx.init(params)``: one sharding per leaf.

  Raises:
    ValueError: a parameter without a sharding, or a state leaf of a
      parameter whose shape is neither the parameter's, a scalar, nor a
      factored statistic's (name the shardings of such a leaf yourself).

  Example:
    >>> import jax, jax.numpy as jnp, madam_optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('model',))
    >>> sharding = NamedSharding(mesh, P(None, 'model'))
    >>> params = {'w': jax.device_put(jnp.ones((4, 8)), sharding)}
    >>> tx = madam_optax.madam()
    >>> shardings = madam_optax.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> rms = state[0].rms_hat['w']   # the second moment: sharded like 'w'
    >>> bound = state[3].max_magnitude['w']   # the bound: replicated
    >>> print(tuple(rms.sharding.spec), tuple(bound.sharding.spec))
    (None, 'model') ()

  References:
    Optax's ``optax.tree.map_params``, whose placeholder init locates the
    per-parameter entries of a state.
  """
  params = jax.tree_util.tree_map_with_path(_abstract, params)
  state = jax.eval_shape(tx.init, params)
  owners = optax.tree.map_params(
    tx,
    lambda leaf, p: leaf if tree_utils.is_masked(leaf) else _Owner(p),
    state,
    params,
    transform_non_params=lambda leaf: _NOT_PER_PARAM,
    is_leaf=tree_utils.is_masked,
  )
  first = next(iter(jax.tree.leaves(params)), None)

  def rule(path, leaf, owner):
    where = f"state leaf {tree_utils.leaf_name(path)}"
    if owner is _NOT_PER_PARAM:
      if first is None:
        raise ValueError("state_shardings: params hold no array.")
      return _replicated(first.sharding, where)
    p = owner.param
    if leaf.shape == p.shape:
      return p.sharding
    if leaf.ndim == 0:
      return _replicated(p.sharding, where)
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    statistic = names[-1] if names else None
    axes = factored_second_moment.factored_axes(p.shape, 1)
    if statistic in _FACTORED and axes is not None:
      dropped = axes[_FACTORED[statistic]]
      if leaf.shape == p.shape[:dropped] + p.shape[dropped + 1 :]:
        return _without_axis(p.sharding, len(p.shape), dropped, where)
    raise ValueError(
      f"state_shardings: {where} has shape {leaf.shape}, but its parameter's "
      f"is {p.shape}: it is neither the parameter's shape, a scalar, nor a "
      "factored statistic. Give this leaf's sharding yourself."
    )

  return jax.tree_util.tree_map_with_path(rule, state, owners)
