"""Bytes held by a tree of arrays: in all, and on each device.

The one byte counter of the examples: parameter bytes of float weights
against LNS codes (``lns_digits``), and the per-device bytes of a sharded
model and optimizer state (``sharded_train``).
"""

from __future__ import annotations

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

  Args:
    tree: a pytree of arrays (JAX or NumPy; Flax ``nnx.State`` included),
      or of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``: the
      bytes they would take); ``None`` leaves and leaves without storage
      (Python numbers, strings) count nothing.
    where: if given, only leaves for which ``where(leaf)`` is true count.

  Returns:
    The sum of the leaves' ``nbytes``: an ``int8`` code counts 1 byte, a
    ``float32`` weight 4.

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

  Args:
    tree: a pytree of ``jax.Array``s (other leaves are skipped).

  Returns:
    ``{device: bytes}`` over the devices holding any shard.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> counts = bytes_per_device({'w': jnp.ones(3)})
    >>> list(counts.values())
    [12]
  """
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      totals[shard.device] = totals.get(shard.device, 0) + _leaf_bytes(
        shard.data
      )
  return totals


def log_memory(state: Any, log: Callable[[str], None]) -> None:
  """The params' and optimizer state's bytes on each of this process's
  devices (every device of a single-process run)."""
  model_bytes = bytes_per_device(state.params)
  opt_bytes = bytes_per_device(state.opt_state)
  devices = sorted(model_bytes, key=lambda d: d.id)
  where = (
    f"all {len(devices)} devices"
    if len(devices) == jax.device_count()
    else f"this process's {len(devices)} of {jax.device_count()} devices"
  )
  log(f"memory on {where}:")
  for device in devices:
    log(
      f"  {device}: params {model_bytes[device] / 1024:.1f} KiB, optimizer "
      f"state {opt_bytes.get(device, 0) / 1024:.1f} KiB"
    )
