"""Device meshes, shardings and global batches for data parallel plus FSDP.

A ``(data, fsdp)`` mesh: the batch is split over both axes, the parameters
and their optimizer state over ``fsdp``. Each process builds only its own
rows of a global batch. Also: the collectives in compiled HLO.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding
import numpy as np

from madam_examples.cli import InputError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device
COLLECTIVES = (
  "all-reduce all-gather reduce-scatter collective-permute all-to-all"
)


def parse_mesh(
  spec: str, num_devices: int, *, hint: str = ""
) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (a missing axis is 1).

  One size may be ``-1``: the devices the others leave. Raises
  ``InputError`` (a ``ValueError``) for unknown axes, bad sizes, or a product
  that is not ``num_devices`` (``hint`` ends that message).

  Example:
    >>> parse_mesh("data=-1,fsdp=2", 8)
    {'data': 4, 'fsdp': 2}
  """
  items = [re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", s.strip())
           for s in spec.split(",") if s.strip()]  # fmt: skip
  names = [m[1] for m in items if m and m[1] in MESH_AXES]
  if len(names) < len(items) or len(set(names)) < len(names):
    raise InputError(
      f"--mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
      f"{MESH_AXES}, each at most once, e.g. 'data=2,fsdp=4'."
    )
  sizes = dict.fromkeys(MESH_AXES, 1) | {m[1]: int(m[2]) for m in items if m}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise InputError(
      f"--mesh {spec!r}: sizes must be positive (one may be -1)."
    )
  known = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % known:
      raise InputError(
        f"--mesh {spec!r}: {num_devices} devices are not a "
        f"multiple of {known}{hint}."
      )
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise InputError(
      f"--mesh {spec!r} has {math.prod(sizes.values())} devices but JAX "
      f"sees {num_devices}; make the sizes multiply to {num_devices} (or use "
      f"-1 for one axis){hint}."
    )
  return sizes


def make_mesh(
  spec: str, devices: Sequence[Any] | None = None
) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all, all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape, auto = tuple(sizes.values()), (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The rows of a global batch that this process's devices hold."""
  index = sharding.addressable_devices_indices_map(global_shape).values()
  rows = {i[0].indices(global_shape[0])[:2] for i in index}
  lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(
      f"this process's devices hold rows {sorted(rows)} of the batch, which "
      "are not contiguous; build the mesh with jax.make_mesh (it keeps each "
      "host's devices together)."
    )
  return slice(lo, hi)


def device_batch(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global ``jax.Array`` of the batch from this process's rows only."""
  local = rows[local_rows(sharding, rows.shape)]
  return jax.make_array_from_process_local_data(sharding, local, rows.shape)


def collectives_in_hlo(hlo_text: str) -> list[str]:
  """Cross-device collectives named in compiled HLO text, sorted.

  Example:
    >>> collectives_in_hlo("%x = f32[8]{0} all-reduce(f32[8]{0} %y)")
    ['all-reduce']
  """
  ops = COLLECTIVES.split()
  return sorted(op for op in ops if re.search(rf"\b{op}(-start)?\(", hlo_text))


def state_shardings(
  state: Any, param_shardings: Any, replicated: NamedSharding
) -> Any:
  """Each leaf of a training state laid out like its parameter.

  An optimizer-state leaf whose path ends with a parameter's path and has
  its shape (Madam's second moment, Adam's moments) gets that parameter's
  sharding; the rest (PRNG key, step and update counts, per-tensor bounds)
  is replicated.
  """
  params = {}  # a parameter's path within its component -> shape, sharding
  for component, tree in state.params.items():
    for (path, x), sharding in zip(
      jax.tree_util.tree_flatten_with_path(tree)[0],
      jax.tree.leaves(param_shardings[component]),
    ):
      params[jax.tree_util.keystr(path)] = (x.shape, sharding)

  longest_first = sorted(params.items(), key=lambda item: -len(item[0]))

  def pick(path, leaf):
    name = jax.tree_util.keystr(path)
    for param, (shape, sharding) in longest_first:
      if name.endswith(param) and tuple(leaf.shape) == tuple(shape):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)


def global_array(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` (whole, on this process) as a global array of that sharding: each
  process fills only its own devices' shards."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
      global_array(jax.random.key_data(x), sharding),
      impl=jax.random.key_impl(x),
    )
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, host.__getitem__)
