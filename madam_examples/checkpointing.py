"""Checkpoint and resume training states with Orbax, safely under preemption.

A *training state* is any pytree of arrays: parameters (float weights or
integer LNS codes), optimizer states (plain ``NamedTuple``s of arrays) and the
PRNG keys; the step number is the checkpoint's name. Recipe (what
``madam-demo --checkpoint-dir`` does)::

  state, start = checkpointing.maybe_restore(checkpoint_dir, state,
                                             config=config)
  with checkpointing.Checkpointer(checkpoint_dir, every=100,
                                  config=config) as ckpt:
    for step in range(start, steps):
      state = train_step(state)
      ckpt.maybe_save(step + 1, state)
    ckpt.maybe_save(steps, state, force=True)

Orbax's ``CheckpointManager`` does the saving: each step is written into a
temporary folder and renamed when complete, so a save cut short is never
listed and the previous complete step is restored. On top of it:

* typed PRNG keys are stored as their raw ``uint32`` data and rewrapped;
  integer LNS codes keep their dtype; a restore target (a live state or
  :func:`abstract_state`) says each array's sharding;
* before any array is read, the checkpoint's tree and its saved ``config``
  are compared with the run's, and the error names what differs;
* a complete step whose files were later lost or garbled is a
  :class:`DamagedCheckpointError` naming the step; :func:`maybe_restore`
  then resumes from the previous step and leaves every file where it was
  (nothing is ever renamed, moved or deleted because it could not be read);
* each save first proves the folder writable, so a
  :class:`CheckpointWriteError` comes at the save that meets it;
* with several JAX processes every process reaches the same verdict.

Relative, absolute and symlinked folders behave the same (paths are made
absolute, never resolved). More: ``docs/checkpointing.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from madam_examples import cli
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
    >>> absolute('/data/runs/../ckpt')
    '/data/ckpt'
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
    ...                  'checkpoint 7')  # doctest: +ELLIPSIS
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
    ...              'checkpoint 7')  # doctest: +ELLIPSIS
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


DEFAULT_MAX_TO_KEEP = 3
DEFAULT_EVERY = 100


# ----------------------------------------------------------------- steps


def _exists(directory: str | os.PathLike | None) -> bool:
  return directory is not None and os.path.isdir(os.fspath(directory))


def all_steps(directory: str | os.PathLike) -> list[int]:
  """The complete (finalised) checkpoint steps in ``directory``, ascending.

  Folders of saves cut short (Orbax's ``*.orbax-checkpoint-tmp-*``, or
  without their commit marker) are not steps.

  Example:
    >>> import os, tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, 10, {'w': jnp.ones(3)})
    >>> os.mkdir(os.path.join(d, '20.orbax-checkpoint-tmp-1700000000'))
    >>> all_steps(d), latest_step(d)          # the cut-short save is no step
    ([10], 10)
  """
  if not _exists(directory):
    return []
  directory = absolute(directory)
  # Listed without a CheckpointManager: with several processes, opening one
  # is a barrier, which every process must reach whatever it finds here.
  return finalised_steps(directory)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step in ``directory``, or ``None``.

  Example:
    >>> import tempfile
    >>> latest_step(tempfile.mkdtemp()) is None
    True
  """
  steps = all_steps(directory)
  return steps[-1] if steps else None


def save(
  directory: str | os.PathLike,
  step: int,
  state: Any,
  *,
  max_to_keep: int | None = DEFAULT_MAX_TO_KEEP,
  config: dict[str, Any] | None = None,
) -> str:
  """Saves ``state`` as checkpoint ``step`` of ``directory`` and waits for it.

  The save is atomic (see the module docstring): until it returns, ``step``
  does not exist for :func:`latest_step` or :func:`restore`.

  Args:
    directory: the checkpoint folder (created if needed).
    step: the number of training steps ``state`` has done.
    state: a pytree of arrays (params, optimizer state, PRNG keys...).
    max_to_keep: how many newest steps to keep (``None``: all).
    config: optional JSON-able dict of the model and optimizer settings
      (e.g. ``{"optimizer": "lns_madam", "lns_levels": 127}``), saved with
      the step and checked by :func:`restore` when given one.

  Returns:
    The folder of the new checkpoint.

  Raises:
    ValueError: when ``step`` is already saved in ``directory``.
    CheckpointWriteError: when ``directory`` cannot be written.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, madam_optax
    >>> params = {'w': jnp.array([0.5, -2.0])}
    >>> tx = madam_optax.madam()
    >>> state = {'params': params, 'opt_state': tx.init(params)}
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, 1, state, config={'optimizer': 'madam'})
    >>> restored = restore(d, state, config={'optimizer': 'madam'})
    >>> restored['params']['w']
    Array([ 0.5, -2. ], dtype=float32)
  """
  directory = absolute(directory)
  check_writable(directory, step)
  manager = open_manager(directory, max_to_keep=max_to_keep)
  try:
    if step in manager.all_steps():
      raise ValueError(
        f"step {step} is already saved in {os.fspath(directory)}; restore "
        "it with `maybe_restore`, or save under a new step number."
      )
    write_step(manager, step, state, config)
    manager.wait_until_finished()
  finally:
    manager.close()
  return os.path.join(os.fspath(directory), str(step))


def restore(
  directory: str | os.PathLike,
  target: Any,
  step: int | None = None,
  *,
  config: dict[str, Any] | None = None,
) -> Any:
  """Restores checkpoint ``step`` (default: the latest complete one).

  Args:
    directory: the checkpoint folder.
    target: a state with the structure, shapes, dtypes and shardings to
      restore into: a live state (e.g. freshly initialised) or its
      :func:`abstract_state` (``jax.ShapeDtypeStruct`` with ``sharding``).
    step: the step to restore; ``None`` for the latest.
    config: the run's settings (see :func:`save`); when the checkpoint was
      saved with a config, every differing setting is an error.

  Returns:
    The restored state, each array with the target's sharding.

  Raises:
    DamagedCheckpointError: a file of the step is missing or unreadable
      (the message names the step and the fix).
    ValueError: no checkpoint; the checkpoint's config differs from
      ``config`` (the message names the settings); or the checkpoint's tree
      differs from the target's (the message names the first differing
      path).
  """
  directory = absolute(directory)
  steps = all_steps(directory)
  if step is None:
    step = steps[-1] if steps else None
  if step is None or step not in steps:
    raise ValueError(
      f"no complete checkpoint {'' if step is None else f'step {step} '}in "
      f"{os.fspath(directory)} (complete steps: {steps})."
    )
  manager = open_manager(directory, read_only=True)
  try:
    return read_step(manager, directory, step, target, config)
  finally:
    manager.close()


def maybe_restore(
  checkpoint_dir: str | os.PathLike | None,
  target: Any,
  *,
  verbose: bool = True,
  config: dict[str, Any] | None = None,
) -> tuple[Any, int]:
  """Resumes from the latest complete checkpoint, or starts from ``target``.

  A damaged step (see :class:`DamagedCheckpointError`) is passed over and
  the previous complete step is tried; a message says so. Nothing is
  renamed, moved or deleted: the damaged step's files stay where they are
  (a later save of that step number is skipped, see
  :meth:`Checkpointer.maybe_save`). When no earlier step is left, the error
  is raised.

  Args:
    checkpoint_dir: the checkpoint folder; ``None`` or a folder without a
      complete checkpoint means a fresh start.
    target: the freshly initialised state (returned as is on a fresh start),
      or its :func:`abstract_state` (then a fresh start is an error).
    verbose: print where training resumes from, and any step passed over.
    config: the run's settings, checked against the checkpoint's (see
      :func:`save`).

  Returns:
    ``(state, step)``: the restored state and its step, or ``(target, 0)``.

  Raises:
    DamagedCheckpointError: the only complete steps left are damaged.
    ValueError: as :func:`restore`.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> state, step = maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)
    >>> step
    0
    >>> _ = save(d, 5, {'w': jnp.ones(2)})
    >>> state, step = maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)
    >>> step, state['w']
    (5, Array([1., 1.], dtype=float32))
  """
  if checkpoint_dir is not None:
    checkpoint_dir = absolute(checkpoint_dir)
  steps = all_steps(checkpoint_dir) if checkpoint_dir is not None else []
  if checkpoint_dir is not None:
    check_same_steps(checkpoint_dir, steps)
  if not steps:
    abstract = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_flatten_with_path(target)[0]
      if isinstance(x, jax.ShapeDtypeStruct)
    ]
    if abstract:
      raise ValueError(
        f"no complete checkpoint in {checkpoint_dir} to fill the abstract "
        f"target (leaf {abstract[0]} is a jax.ShapeDtypeStruct); pass a "
        "freshly initialised state to start from step 0 when there is no "
        "checkpoint."
      )
    if verbose and checkpoint_dir is not None:
      print(f"No checkpoint in {checkpoint_dir}, starting from step 0")
    return target, 0
  for i in range(len(steps) - 1, -1, -1):
    step = steps[i]
    try:
      state = restore(checkpoint_dir, target, step, config=config)
    except DamagedCheckpointError as e:
      if i == 0:
        raise
      if verbose:
        print(
          f"Checkpoint step {step} in {checkpoint_dir} is damaged "
          f"({e.reason}); its files are left as they are (later saves pass "
          f"over step {step}), trying step {steps[i - 1]}",
          flush=True,
        )
      continue
    if verbose:
      print(f"Resumed from step {step} in {checkpoint_dir}")
    return state, step
  raise AssertionError("unreachable: the loop returns or raises")


# ----------------------------------------------------------------- training loop


class Checkpointer:
  """Periodic, atomic saves for a training loop (``--checkpoint-every``).

  Saves run in the background (Orbax's asynchronous checkpointing: the arrays
  are copied to host memory before ``maybe_save`` returns and written while
  training goes on); the next save and :meth:`close` wait for the previous
  one. Each save first checks that the folder can be written, so a folder
  that cannot be written fails that save (:class:`CheckpointWriteError`).
  Opening a folder removes the temporary folders of saves that a crash cut
  short.

  Args:
    directory: the checkpoint folder (created if needed).
    every: save at steps that are multiples of ``every``.
    max_to_keep: how many newest steps to keep (``None``: all).
    config: optional JSON-able dict of model and optimizer settings, saved
      with every step and checked by :meth:`restore` (see :func:`save`).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d, state = tempfile.mkdtemp(), {'w': jnp.zeros(2)}
    >>> with Checkpointer(d, every=2) as ckpt:
    ...   for step in range(5):
    ...     state = {'w': state['w'] + 1}
    ...     _ = ckpt.maybe_save(step + 1, state)
    ...   _ = ckpt.maybe_save(5, state, force=True)
    >>> all_steps(d)
    [2, 4, 5]
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    every: int = DEFAULT_EVERY,
    *,
    max_to_keep: int | None = DEFAULT_MAX_TO_KEEP,
    config: dict[str, Any] | None = None,
  ):
    if every < 1:
      raise ValueError(f"--checkpoint-every must be >= 1, got {every}.")
    self.directory = absolute(directory)
    self.every = int(every)
    self.config = normalise_config(config)
    self._manager = open_manager(
      directory, max_to_keep=max_to_keep, asynchronous=True
    )

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves when ``step`` is a multiple of ``every`` (or ``force``) and new.

    A step already in the folder is never overwritten (not even a damaged
    one that :func:`maybe_restore` passed over): it is skipped.
    """
    step = int(step)
    if not force and step % self.every:
      return False
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      return False
    check_writable(self.directory, step)
    write_step(self._manager, step, state, self.config)
    return True

  def restore(self, target: Any) -> tuple[Any, int]:
    """``maybe_restore(self.directory, target, config=self.config)``."""
    return maybe_restore(self.directory, target, config=self.config)

  def close(self) -> None:
    """Waits for the pending save and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds ``--checkpoint-dir`` and ``--checkpoint-every`` to a CLI parser.

  Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> args = parser.parse_args(['--checkpoint-dir', 'ckpt'])
    >>> args.checkpoint_dir, args.checkpoint_every
    ('ckpt', 100)
  """
  group = parser.add_argument_group("checkpointing (Orbax)")
  group.add_argument(
    "--checkpoint-dir",
    type=cli.output_dir,
    default=None,
    help="save checkpoints here, and resume from the latest complete one "
    "when there is one (proven writable before training starts)",
  )
  group.add_argument(
    "--checkpoint-every",
    type=cli.positive_int,
    default=DEFAULT_EVERY,
    help=f"steps between checkpoints (default {DEFAULT_EVERY}); the last "
    "step is always saved",
  )
