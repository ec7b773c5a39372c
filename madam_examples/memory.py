"""Bytes held by a tree of arrays, in all and on each device: float weights
against LNS codes (``lns_digits``), a sharded state (``sharded_train``)."""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import jax
import numpy as np


def _leaf_bytes(x: Any) -> int:
  if isinstance(x, jax.ShapeDtypeStruct):  # abstract: what it would hold
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key
  ):
    x = jax.random.key_data(x)  # typed PRNG keys: their raw data
  nbytes = getattr(x, "nbytes", None)
  return int(nbytes) if nbytes is not None else 0  # no storage: a number


def tree_bytes(tree: Any, where: Callable[[Any], bool] | None = None) -> int:
  """The bytes of every array in ``tree`` (global, whatever the sharding).

  ``tree``: arrays (JAX, NumPy, Flax ``nnx.State``) or
  ``jax.ShapeDtypeStruct`` (the bytes they would take); other leaves count
  nothing. ``where``: if given, only the leaves it is true for count.

  Example:
    >>> import jax.numpy as jnp
    >>> tree_bytes({'codes': jnp.zeros((4, 8), jnp.int8), 'w': jnp.ones(3)})
    44
  """
  return sum(
    _leaf_bytes(x) for x in jax.tree.leaves(tree) if where is None or where(x)
  )


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """The bytes of ``tree``'s arrays that each addressable device holds.

  A replicated array counts in full on every device that holds a copy; an
  array split over ``n`` devices counts ``1/n`` on each.

  Returns ``{device: bytes}`` over the devices holding any shard of
  ``tree``'s ``jax.Array``s (other leaves are skipped).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> counts = bytes_per_device({'w': jnp.ones(3)})
    >>> list(counts.values())
    [12]
  """
  totals: dict[Any, int] = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      totals[shard.device] += _leaf_bytes(shard.data)
  return dict(totals)
