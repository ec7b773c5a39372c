"""How a training state is stored with Orbax, and read back checked.

* Typed PRNG keys are stored as their raw ``uint32`` data and rewrapped on
  restore (:func:`storable`, :func:`rewrap_keys`).
* A restore target is a tree of ``jax.ShapeDtypeStruct`` with shardings
  (:func:`abstract_state`, :func:`abstract_leaf`).
* Before any array is read, the checkpoint's tree is compared with the
  target's (:func:`check_compatible`) and its saved settings with the run's
  (:func:`check_config`); each error names what differs.

Used by :mod:`madam_examples.checkpointing`, which is the interface.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# ------------------------------------------------------- PRNG keys, targets


def is_typed_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(key_like: Any) -> Any:
  """The PRNG implementation of a typed key array or of its ShapeDtypeStruct."""
  found = []
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key_like)
  return found[0]


def storable(state: Any) -> Any:
  """``state`` with typed PRNG keys replaced by their raw ``uint32`` data."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if is_typed_key(x) else x, state
  )


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _replicated_like(sharding: Any) -> jax.sharding.Sharding:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec()
    )
  return sharding if sharding is not None else _default_sharding()


def abstract_leaf(x: Any) -> Any:
  """What Orbax restores a leaf of the target as (shape, dtype, sharding)."""
  if is_typed_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = (
      jax.random.key_data(x).sharding
      if isinstance(x, jax.Array)
      else _replicated_like(getattr(x, "sharding", None))
    )
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=x.sharding or _default_sharding()
    )
  return x  # NumPy arrays and Python scalars are restored as such.


def abstract_state(state: Any, shardings: Any = None) -> Any:
  """The restore target for ``state``: ``jax.ShapeDtypeStruct``s with shardings.

  Args:
    state: a live training state (its arrays' shardings are kept) or a tree
      of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape(init, ...)``).
    shardings: optional tree of ``jax.sharding.Sharding`` with the structure
      of ``state``, to restore onto a mesh in another layout.

  Returns:
    A tree of ``jax.ShapeDtypeStruct`` (typed PRNG keys keep their key dtype)
    that :func:`restore` and :func:`maybe_restore` accept as ``target``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> abstract_state({'w': jnp.zeros((2, 3), jnp.int8)})['w'].dtype
    dtype('int8')
  """
  leaves, treedef = jax.tree.flatten(state)
  if shardings is None:
    targets = [getattr(x, "sharding", None) for x in leaves]
  else:
    targets = treedef.flatten_up_to(shardings)
  return treedef.unflatten(
    [
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
      if hasattr(x, "shape") and hasattr(x, "dtype")
      else x
      for x, s in zip(leaves, targets)
    ]
  )


def normalise_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
  """``config`` as it reads back from JSON (tuples become lists...)."""
  if config is None:
    return None
  if not isinstance(config, dict):
    raise ValueError(f"config must be a dict of settings, got {type(config)}.")
  try:
    return json.loads(json.dumps(config, sort_keys=True))
  except TypeError as e:
    raise ValueError(
      f"config must be JSON-able (numbers, strings, lists, dicts): {e}. "
      "Convert other values with str() first."
    ) from e


# ----------------------------------------------------------------- checks


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
  return f"{np.dtype(dtype).name}{list(shape)}"


def _leaf_signature(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), np.dtype(x.dtype)
  arr = np.asarray(x)
  return tuple(arr.shape), arr.dtype


def _flat(tree: Any) -> dict[str, Any]:
  return {
    ".".join(ocp.tree.str_keypath(path)): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_compatible(saved_tree: Any, target: Any, where: str) -> None:
  """Raises ``ValueError`` naming the first path where two trees differ.

  Args:
    saved_tree: the checkpoint's metadata tree (leaves with ``shape`` and
      ``dtype``).
    target: the restore target (arrays, ``jax.ShapeDtypeStruct``s, scalars).
    where: the checkpoint's description for the message.

  Example:
    >>> import jax.numpy as jnp
    >>> check_compatible({'w': jnp.zeros((4, 3))}, {'w': jnp.zeros((4, 5))},
    ...                  'checkpoint 7')
    Traceback (most recent call last):
    ...
    ValueError: checkpoint 7 does not match the target state at 'w': the checkpoint holds float32[4, 3], the target expects float32[4, 5]. ...
  """
  saved = _flat(saved_tree)
  wanted = _flat(jax.tree.map(abstract_leaf, target))
  hint = (
    "The checkpoint was written by a different model or optimizer "
    "configuration (optimizer, layer sizes, LNS format, state dtype). "
    "Resume with the configuration that wrote it, or use a new "
    "checkpoint folder."
  )
  for name, leaf in wanted.items():
    if name not in saved:
      raise ValueError(
        f"{where} does not match the target state: the target's leaf "
        f"'{name}' ({_describe(*_leaf_signature(leaf))}) is not in the "
        f"checkpoint. {hint}"
      )
    got, want = _leaf_signature(saved[name]), _leaf_signature(leaf)
    if got != want:
      raise ValueError(
        f"{where} does not match the target state at '{name}': the "
        f"checkpoint holds {_describe(*got)}, the target expects "
        f"{_describe(*want)}. {hint}"
      )
  for name, leaf in saved.items():
    if name not in wanted:
      raise ValueError(
        f"{where} does not match the target state: the checkpoint's leaf "
        f"'{name}' ({_describe(*_leaf_signature(leaf))}) is not in the "
        f"target. {hint}"
      )


_MISSING = object()


def check_config(
  saved: dict[str, Any] | None, wanted: dict[str, Any], where: str
) -> None:
  """Raises ``ValueError`` naming every setting where two configs differ.

  Args:
    saved: the config stored with the checkpoint (``None``: none stored,
      which is not checked).
    wanted: the config of the run that restores.
    where: the checkpoint's description for the message.

  Example:
    >>> check_config({'lr': 0.01, 'levels': 127}, {'lr': 0.01, 'levels': 100},
    ...              'checkpoint 7')
    Traceback (most recent call last):
    ...
    ValueError: checkpoint 7 was written with another configuration (levels: checkpoint 127, this run 100). ...
  """
  if saved is None:
    return
  wanted = normalise_config(wanted)
  diffs = []
  for name in sorted(set(saved) | set(wanted)):
    got, want = saved.get(name, _MISSING), wanted.get(name, _MISSING)
    if got != want:
      fmt = lambda v: "(not set)" if v is _MISSING else repr(v)
      diffs.append(f"{name}: checkpoint {fmt(got)}, this run {fmt(want)}")
  if diffs:
    raise ValueError(
      f"{where} was written with another configuration ("
      + "; ".join(diffs)
      + "). Resume with the configuration that wrote "
      "it, or use a new checkpoint folder."
    )


def rewrap_keys(target: Any, restored: Any) -> Any:
  """``restored`` with the raw data of ``target``'s typed PRNG keys rewrapped
  as keys of the same implementation and sharding."""

  def rewrap(t, r):
    if not is_typed_key(t):
      return r
    key = jax.random.wrap_key_data(r, impl=_key_impl(t))
    sharding = getattr(t, "sharding", None)
    return jax.device_put(key, sharding) if sharding is not None else key

  return jax.tree.map(rewrap, target, restored)


# ----------------------------------------------------------------- Orbax


def open_manager(
  directory: str | os.PathLike,
  *,
  max_to_keep: int | None = None,
  every: int = 1,
  read_only: bool = False,
  asynchronous: bool = False,
) -> ocp.CheckpointManager:
  """An Orbax manager of ``directory``: one state tree per step."""
  # Readers do not create the folder. (Orbax's own ``read_only`` mode would
  # also do, but it logs two warnings per call.)
  # Writers remove the temporary folders of saves cut short by a crash
  # (readers never take them for steps, see ``all_steps``).
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    save_interval_steps=every,
    create=not read_only,
    enable_async_checkpointing=asynchronous,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.fspath(directory)),
    item_handlers=ocp.StandardCheckpointHandler(),
    options=options,
  )


def write_step(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  config: dict[str, Any] | None,
) -> None:
  """Starts saving ``state`` (keys as raw data) and ``config`` as ``step``."""
  config = normalise_config(config)
  manager.save(
    int(step),
    args=ocp.args.StandardSave(storable(state)),
    force=True,
    custom_metadata=None if config is None else {"config": config},
  )


def _saved_config(manager: ocp.CheckpointManager, step: int) -> Any:
  custom = getattr(manager.metadata(step), "custom_metadata", None) or {}
  return custom.get("config")


def read_step(
  manager: ocp.CheckpointManager,
  directory,
  step: int,
  target: Any,
  config: dict[str, Any] | None = None,
) -> Any:
  """Checks step ``step`` against ``config`` and ``target``, then reads it
  into the target's shapes, dtypes and shardings."""
  where = f"checkpoint step {step} in {os.fspath(directory)}"
  if config is not None:
    check_config(_saved_config(manager, step), config, where)
  metadata = manager.item_metadata(step)
  check_compatible(getattr(metadata, "tree", metadata), target, where)
  abstract = jax.tree.map(abstract_leaf, target)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return rewrap_keys(target, restored)
