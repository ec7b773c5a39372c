"""How a training state is stored with Orbax, and read back checked.

* Typed PRNG keys are stored as their raw ``uint32`` data and rewrapped on
  restore (:func:`storable`, :func:`rewrap_keys`).
* A restore target is a tree of ``jax.ShapeDtypeStruct`` with shardings
  (:func:`abstract_state`, :func:`abstract_leaf`).
* Before any array is read, the checkpoint's tree is compared with the
  target's (:func:`check_compatible`) and its saved settings with the run's
  (:func:`check_config`); each error names what differs.
* A step whose files are missing or unreadable (its ``_CHECKPOINT_METADATA``
  or ``_METADATA`` lost or garbled, an array file truncated or deleted) is a
  :class:`DamagedCheckpointError` naming the step and the fix, never a raw
  TensorStore or decoding error; a folder that cannot be written is a
  :class:`CheckpointWriteError` at the save that meets it
  (:func:`check_writable`).
* With several JAX processes, every process reaches the same verdict
  (:func:`all_processes_ok`): one that cannot read its shards makes the step
  damaged for all.

Used by :mod:`madam_examples.checkpointing`, which is the interface.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from madam_examples import processes

# Orbax's files in a step folder: the step's metadata (the saved config is in
# it), and the item folder with its tree metadata and array data.
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM = "default"
ITEM_METADATA = "_METADATA"


class DamagedCheckpointError(ValueError):
  """A complete (finalised) checkpoint step whose files cannot be read.

  Attributes:
    directory: the checkpoint folder.
    step: the damaged step.
    reason: what is wrong, e.g. ``"its _CHECKPOINT_METADATA is missing"``.
  """

  def __init__(self, directory: str | os.PathLike, step: int, reason: str):
    self.directory = os.fspath(directory)
    self.step = int(step)
    self.reason = reason
    super().__init__(
      f"checkpoint step {step} in {self.directory} is damaged ({reason}). "
      f"Move or delete the folder {step_path(directory, step)} (a rerun "
      "then resumes from the previous complete step, or from step 0 if "
      "there is none), or restore it from a copy."
    )


class CheckpointWriteError(OSError):
  """A checkpoint folder that this process cannot write into."""


def step_path(directory: str | os.PathLike, step: int) -> str:
  """The folder of checkpoint ``step`` in ``directory``."""
  return os.path.join(absolute(directory), str(int(step)))


def absolute(directory: str | os.PathLike) -> str:
  """``directory`` as an absolute path (Orbax reads only absolute paths).

  A symbolic link in it is kept (not resolved), so messages name the folder
  the user gave.

  Example:
    >>> absolute('/tmp/ckpt/../ckpt')
    '/tmp/ckpt'
  """
  return os.path.abspath(os.fspath(directory))


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


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: str, what: str) -> dict[str, Any]:
  """A JSON object file of a checkpoint step, or the reason it is unreadable."""
  if not os.path.exists(path):
    raise _Damage(f"its {what} is missing")
  try:
    with open(path, "rb") as f:
      value = json.loads(f.read().decode("utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise _Damage(f"its {what} is unreadable: {_one_line(e, 80)}") from e
  if not isinstance(value, dict):
    raise _Damage(f"its {what} is not a JSON object")
  return value


class _Damage(Exception):
  """Internal: the reason a step is damaged (becomes DamagedCheckpointError)."""


def finalised_steps(directory: str | os.PathLike) -> list[int]:
  """The complete steps in ``directory``, ascending (no barrier)."""
  return sorted(ocp.utils.checkpoint_steps(os.fspath(directory)))


def check_same_steps(directory: str | os.PathLike, steps: list[int]) -> None:
  """Raises ``ValueError`` unless every process lists the same latest step.

  Each process reads the folder on its own; on several hosts it must be on
  a file system that all of them share.
  """
  latest = steps[-1] if steps else -1
  seen = processes.gather(np.array([latest, len(steps)], np.int64))
  if (seen == seen[0]).all():
    return
  views = ", ".join(
    f"process {i}: {int(row[0]) if row[0] >= 0 else 'none'}"
    for i, row in enumerate(seen)
  )
  raise ValueError(
    f"the processes see different checkpoints in {os.fspath(directory)} "
    f"(latest step {views}). Every process must see the same folder: on "
    "several hosts, put it on a file system they all share."
  )


def all_processes_ok(ok: bool) -> list[bool]:
  """Every JAX process's ``ok``, in process order (one process: ``[ok]``).

  A collective: every process must call it, in the same order.
  """
  flags = processes.gather(np.array([ok], np.bool_))
  return [bool(x) for x in flags.reshape(-1)]


def check_writable(directory: str | os.PathLike, step: int) -> None:
  """Raises :class:`CheckpointWriteError` unless ``directory`` takes a file.

  A save runs in the background: without this check a folder that cannot be
  written (read-only, full, gone) would fail one save later. Every process
  checks, and all raise if any cannot write.

  Example:
    >>> import tempfile
    >>> check_writable(tempfile.mkdtemp(), 10)      # nothing to say
  """
  directory = os.fspath(directory)
  problem = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    problem = e.strerror or _one_line(e)
  verdicts = all_processes_ok(problem is None)
  if all(verdicts):
    return
  if problem is None:
    failed = [i for i, ok in enumerate(verdicts) if not ok]
    problem = f"process {failed[0]} cannot write there"
  raise CheckpointWriteError(
    f"cannot save checkpoint step {step} in {directory}: {problem}. Make "
    "the folder writable (or free space on its disk), or save into another "
    "folder (--checkpoint-dir)."
  )


def _read_checked(
  manager: ocp.CheckpointManager,
  directory,
  step: int,
  target: Any,
  config: dict[str, Any] | None,
) -> Any:
  where = f"checkpoint step {step} in {os.fspath(directory)}"
  path = step_path(directory, step)
  step_metadata = _read_json(os.path.join(path, STEP_METADATA), STEP_METADATA)
  _read_json(os.path.join(path, ITEM, ITEM_METADATA), f"{ITEM}/{ITEM_METADATA}")
  if config is not None:
    saved = (step_metadata.get("custom_metadata") or {}).get("config")
    check_config(saved, config, where)
  try:  # reads each array's own metadata too
    metadata = manager.item_metadata(step)
  except (OSError, ValueError, KeyError) as e:
    raise _Damage(f"an array could not be read: {_one_line(e)}") from e
  check_compatible(getattr(metadata, "tree", metadata), target, where)
  abstract = jax.tree.map(abstract_leaf, target)
  # The handler rather than the manager: it has no barrier, so a process
  # that fails here still reaches the verdict shared by all processes.
  handler = ocp.StandardCheckpointHandler()
  try:
    restored = handler.restore(
      epath.Path(os.path.join(path, ITEM)),
      args=ocp.args.StandardRestore(abstract),
    )
  except (OSError, ValueError) as e:
    raise _Damage(f"an array could not be read: {_one_line(e)}") from e
  finally:
    handler.close()
  return rewrap_keys(target, restored)


def read_step(
  manager: ocp.CheckpointManager,
  directory,
  step: int,
  target: Any,
  config: dict[str, Any] | None = None,
) -> Any:
  """Checks step ``step`` against ``config`` and ``target``, then reads it
  into the target's shapes, dtypes and shardings.

  Raises:
    DamagedCheckpointError: a file of the step is missing or unreadable (on
      any process: every process raises it).
    ValueError: the step was written with another configuration or tree.
  """
  damage, result = None, None
  try:
    result = _read_checked(manager, directory, step, target, config)
  except _Damage as e:
    damage = str(e)
  verdicts = all_processes_ok(damage is None)
  if all(verdicts):
    return result
  if damage is None:
    failed = [i for i, ok in enumerate(verdicts) if not ok]
    damage = f"process {failed[0]} could not read it"
  raise DamagedCheckpointError(directory, step, damage)
