"""Checkpoint and resume training states with Orbax, safely under preemption.

A *training state* is any pytree of arrays (parameters, integer LNS codes,
optimizer states, typed PRNG keys); the step number names the checkpoint.
Recipe (what ``madam-demo --checkpoint-dir`` does)::

  state, start = checkpointing.maybe_restore(ckpt_dir, state, config=config)
  with checkpointing.Checkpointer(ckpt_dir, every=100, config=config) as ckpt:
    for step in range(start, steps):
      state = train_step(state)
      ckpt.maybe_save(step + 1, state)
    ckpt.maybe_save(steps, state, force=True)

Orbax's ``CheckpointManager`` saves atomically (a save cut short is never
listed), lists the complete steps and keeps ``max_to_keep``. Here: typed PRNG
keys are stored as raw data; the saved ``config`` and tree are checked
before any array is read; a damaged latest step is passed over (nothing is
ever renamed, moved or deleted); each save first proves the folder writable;
every JAX process reaches the same verdict. More: ``docs/checkpointing.md``.
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

DEFAULT_MAX_TO_KEEP = 3
DEFAULT_EVERY = 100


class DamagedCheckpointError(ValueError):
  """A complete (finalised) checkpoint step whose files cannot be read."""

  def __init__(self, directory: str | os.PathLike, step: int, reason: str):
    self.directory, self.step, self.reason = os.fspath(directory), step, reason
    super().__init__(
      f"checkpoint step {step} in {self.directory} is damaged ({reason}). "
      f"Move or delete the folder {step_path(directory, step)} (a rerun "
      "then resumes from the previous complete step, or from step 0 if "
      "there is none), or restore it from a copy."
    )


class CheckpointWriteError(OSError):
  """A checkpoint folder that this process cannot write into."""


class _Damage(Exception):
  """Internal: why a step is damaged (becomes DamagedCheckpointError)."""


def absolute(directory: str | os.PathLike) -> str:
  """``directory`` made absolute (Orbax reads only absolute paths); links
  are kept, not resolved, so messages name the folder the user gave."""
  return os.path.abspath(os.fspath(directory))


def step_path(directory: str | os.PathLike, step: int) -> str:
  """The folder of checkpoint ``step`` in ``directory``."""
  return os.path.join(absolute(directory), str(int(step)))


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------- PRNG keys, targets


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _storable(state: Any) -> Any:
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x, state
  )


def _abstract_leaf(x: Any) -> Any:
  """What Orbax restores a leaf of the target as (shape, dtype, sharding)."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    if isinstance(x, jax.Array):
      sharding = jax.random.key_data(x).sharding
    elif isinstance(
      sharding, jax.sharding.NamedSharding
    ):  # raw data: 1 dim more
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.P())
    return jax.ShapeDtypeStruct(
      data.shape, data.dtype, sharding=sharding or default
    )
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=x.sharding or default
    )
  return x  # NumPy arrays and Python scalars are restored as such.


def _rewrap_keys(target: Any, restored: Any) -> Any:
  def rewrap(t, r):
    if not _is_key(t):
      return r
    impl = []
    jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), t)
    key = jax.random.wrap_key_data(r, impl=impl[0])
    sharding = getattr(t, "sharding", None)
    return jax.device_put(key, sharding) if sharding is not None else key

  return jax.tree.map(rewrap, target, restored)


def abstract_state(state: Any, shardings: Any = None) -> Any:
  """The restore target for ``state`` (live, or ``jax.ShapeDtypeStruct``s):
  shapes, dtypes and its shardings, or ``shardings`` for another layout.

  Example:
    >>> import jax.numpy as jnp
    >>> abstract_state({'w': jnp.zeros((2, 3), jnp.int8)})['w'].dtype
    dtype('int8')
  """
  leaves, treedef = jax.tree.flatten(state)
  targets = (
    [getattr(x, "sharding", None) for x in leaves]
    if shardings is None
    else treedef.flatten_up_to(shardings)
  )
  return treedef.unflatten(
    [
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
      if hasattr(x, "shape") and hasattr(x, "dtype")
      else x
      for x, s in zip(leaves, targets)
    ]
  )


# ----------------------------------------------------------------- checks


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


def _signature(x: Any) -> str:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    x = np.asarray(x)
  return f"{np.dtype(x.dtype).name}{list(x.shape)}"


def _flat(tree: Any) -> dict[str, Any]:
  return {
    ".".join(ocp.tree.str_keypath(path)): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_compatible(saved_tree: Any, target: Any, where: str) -> None:
  """Raises ``ValueError`` naming the first path where two trees differ.

  Example:
    >>> import jax.numpy as jnp
    >>> check_compatible({'w': jnp.zeros((4, 3))}, {'w': jnp.zeros((4, 5))},
    ...                  'checkpoint 7')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: checkpoint 7 does not match the target state at 'w': the checkpoint holds float32[4, 3], the target expects float32[4, 5]. ...
  """
  saved = _flat(saved_tree)
  wanted = _flat(jax.tree.map(_abstract_leaf, target))
  hint = (
    "The checkpoint was written by a different model or optimizer "
    "configuration (optimizer, layer sizes, LNS format, state dtype). "
    "Resume with the configuration that wrote it, or use a new "
    "checkpoint folder."
  )
  for name in [*wanted, *(n for n in saved if n not in wanted)]:
    if name not in saved:
      problem = f"the target's leaf '{name}' ({_signature(wanted[name])})"
      problem = f": {problem} is not in the checkpoint"
    elif name not in wanted:
      problem = f"the checkpoint's leaf '{name}' ({_signature(saved[name])})"
      problem = f": {problem} is not in the target"
    elif (got := _signature(saved[name])) != (want := _signature(wanted[name])):
      problem = f" at '{name}': the checkpoint holds {got}, the target expects"
      problem = f"{problem} {want}"
    else:
      continue
    raise ValueError(
      f"{where} does not match the target state{problem}. {hint}"
    )


def check_config(
  saved: dict | None, wanted: dict[str, Any], where: str
) -> None:
  """Raises ``ValueError`` naming every setting where two configs differ
  (``saved`` ``None``: none stored, nothing checked).

  Example:
    >>> check_config({'lr': 0.01, 'levels': 127}, {'lr': 0.01, 'levels': 100},
    ...              'checkpoint 7')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: checkpoint 7 was written with another configuration (levels: checkpoint 127, this run 100). ...
  """
  if saved is None:
    return
  wanted = normalise_config(wanted) or {}
  fmt = lambda d, k: repr(d[k]) if k in d else "(not set)"
  diffs = [
    f"{k}: checkpoint {fmt(saved, k)}, this run {fmt(wanted, k)}"
    for k in sorted(set(saved) | set(wanted))
    if saved.get(k, KeyError) != wanted.get(k, KeyError)
  ]
  if diffs:
    raise ValueError(
      f"{where} was written with another configuration ({'; '.join(diffs)})."
      " Resume with the configuration that wrote it, or use a new "
      "checkpoint folder."
    )


def _all_ok(ok: bool) -> list[bool]:
  """Every process's ``ok``, in process order (a collective)."""
  return [bool(x) for x in processes.gather(np.array([ok], np.bool_)).ravel()]


def _verdict(problem: str | None, what: str) -> str | None:
  """The first problem any process met (every process gets the same)."""
  verdicts = _all_ok(problem is None)
  if all(verdicts) or problem is not None:
    return problem
  return f"process {verdicts.index(False)} {what}"


def check_writable(directory: str | os.PathLike, step: int) -> None:
  """Raises :class:`CheckpointWriteError` unless ``directory`` takes a file
  on every process (a background save would fail one save later)."""
  directory, problem = os.fspath(directory), None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    problem = e.strerror or _one_line(e)
  problem = _verdict(problem, "cannot write there")
  if problem is not None:
    raise CheckpointWriteError(
      f"cannot save checkpoint step {step} in {directory}: {problem}. Make "
      "the folder writable (or free space on its disk), or save into "
      "another folder (--checkpoint-dir)."
    )


# ----------------------------------------------------------------- Orbax


def _manager(directory: str, max_to_keep=None, asynchronous=False):
  return ocp.CheckpointManager(
    directory,
    item_handlers=ocp.StandardCheckpointHandler(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=True,  # saves cut short by a crash
    ),
  )


def _write(manager, step: int, state: Any, config: dict | None) -> None:
  manager.save(
    int(step),
    args=ocp.args.StandardSave(_storable(state)),
    force=True,
    custom_metadata=None if config is None else {"config": config},
  )


def _read_json(path: str, what: str) -> dict[str, Any]:
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


def _read(directory: str, step: int, target: Any, config: dict | None) -> Any:
  where, path = (
    f"checkpoint step {step} in {directory}",
    step_path(directory, step),
  )
  # Orbax's files: the step's metadata (holds the config) and the item's.
  meta = _read_json(
    os.path.join(path, "_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA"
  )
  _read_json(os.path.join(path, "default", "_METADATA"), "default/_METADATA")
  if config is not None:
    check_config(
      (meta.get("custom_metadata") or {}).get("config"), config, where
    )
  # The handler, not a manager: it has no barrier, so a process that fails
  # here still reaches the verdict shared by all processes.
  handler, item = ocp.StandardCheckpointHandler(), epath.Path(path) / "default"
  try:
    metadata = handler.metadata(item)
    check_compatible(getattr(metadata, "tree", metadata), target, where)
    abstract = jax.tree.map(_abstract_leaf, target)
    restored = handler.restore(item, args=ocp.args.StandardRestore(abstract))
  except (OSError, KeyError) as e:
    raise _Damage(f"an array could not be read: {_one_line(e)}") from e
  except ValueError as e:
    if str(e).startswith(where):  # a config or tree mismatch: not damage
      raise
    raise _Damage(f"an array could not be read: {_one_line(e)}") from e
  finally:
    handler.close()
  return _rewrap_keys(target, restored)


def all_steps(directory: str | os.PathLike | None) -> list[int]:
  """The complete (finalised) checkpoint steps in ``directory``, ascending.

  Listed by Orbax without a manager (opening one is a barrier); folders of
  saves cut short are not steps.

  Example:
    >>> import os, tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, 10, {'w': jnp.ones(3)})
    >>> os.mkdir(os.path.join(d, '20.orbax-checkpoint-tmp-1700000000'))
    >>> all_steps(d), latest_step(d)          # the cut-short save is no step
    ([10], 10)
  """
  if directory is None or not os.path.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(absolute(directory)))


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step in ``directory``, or ``None``."""
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
  """Saves ``state`` as checkpoint ``step`` of ``directory`` and waits.

  ``config``: an optional JSON-able dict of the run's settings, saved with
  the step and checked by :func:`restore`. Returns the step's folder.

  Example:
    >>> import tempfile, jax.numpy as jnp, madam_optax
    >>> params = {'w': jnp.array([0.5, -2.0])}
    >>> state = {'params': params, 'opt_state': madam_optax.madam().init(params)}
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, 1, state, config={'optimizer': 'madam'})
    >>> restore(d, state, config={'optimizer': 'madam'})['params']['w']
    Array([ 0.5, -2. ], dtype=float32)
  """
  directory = absolute(directory)
  check_writable(directory, step)
  manager = _manager(directory, max_to_keep)
  try:
    if step in manager.all_steps():
      raise ValueError(
        f"step {step} is already saved in {directory}; restore it with "
        "`maybe_restore`, or save under a new step number."
      )
    _write(manager, step, state, normalise_config(config))
    manager.wait_until_finished()
  finally:
    manager.close()
  return step_path(directory, step)


def restore(
  directory: str | os.PathLike,
  target: Any,
  step: int | None = None,
  *,
  config: dict[str, Any] | None = None,
) -> Any:
  """Restores checkpoint ``step`` (default: the latest complete one) into
  ``target``'s shapes, dtypes and shardings.

  ``target`` is a live state or its :func:`abstract_state`; every setting
  of ``config`` that differs from the saved one is an error.

  Raises:
    DamagedCheckpointError: a file of the step is missing or unreadable on
      some process (every process raises it).
    ValueError: no such checkpoint, or its config or tree differs (the
      message names what differs).
  """
  directory = absolute(directory)
  steps = all_steps(directory)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None or step not in steps:
    raise ValueError(
      f"no complete checkpoint {'' if step is None else f'step {step} '}in "
      f"{directory} (complete steps: {steps})."
    )
  damage, result = None, None
  try:
    result = _read(directory, step, target, config)
  except _Damage as e:
    damage = str(e)
  damage = _verdict(damage, "could not read it")
  if damage is not None:
    raise DamagedCheckpointError(directory, step, damage)
  return result


def maybe_restore(
  checkpoint_dir: str | os.PathLike | None,
  target: Any,
  *,
  verbose: bool = True,
  config: dict[str, Any] | None = None,
) -> tuple[Any, int]:
  """Resumes from the latest complete checkpoint, or starts from ``target``.

  A damaged step is passed over (a message says so) and the previous one is
  tried; its files stay where they are, and a later save of that step
  number is skipped. When no earlier step is left, the error is raised.

  ``checkpoint_dir`` ``None`` or without a complete step: a fresh start,
  ``(target, 0)`` (an abstract target is then an error); else ``(state,
  step)``. ``verbose`` prints where training resumes from.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)[1]
    0
    >>> _ = save(d, 5, {'w': jnp.ones(2)})
    >>> maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)
    ({'w': Array([1., 1.], dtype=float32)}, 5)
  """
  steps = []
  if checkpoint_dir is not None:
    checkpoint_dir = absolute(checkpoint_dir)
    steps = all_steps(checkpoint_dir)
    latest = np.array([steps[-1] if steps else -1, len(steps)], np.int64)
    seen = processes.gather(latest)
    if not (seen == seen[0]).all():
      views = ", ".join(
        f"process {i}: {r[0] if r[0] >= 0 else 'none'}"
        for i, r in enumerate(seen)
      )
      raise ValueError(
        f"the processes see different checkpoints in {checkpoint_dir} "
        f"(latest step {views}). Every process must see the same folder: on "
        "several hosts, put it on a file system they all share."
      )
  if not steps:
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
      if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(
          f"no complete checkpoint in {checkpoint_dir} to fill the abstract "
          f"target (leaf {jax.tree_util.keystr(path)} is a "
          "jax.ShapeDtypeStruct); pass a freshly initialised state to start "
          "from step 0 when there is no checkpoint."
        )
    if verbose and checkpoint_dir is not None:
      print(f"No checkpoint in {checkpoint_dir}, starting from step 0")
    return target, 0
  for i in range(len(steps) - 1, -1, -1):
    try:
      state = restore(checkpoint_dir, target, steps[i], config=config)
    except DamagedCheckpointError as e:
      if i == 0:
        raise
      if verbose:
        print(
          f"Checkpoint step {steps[i]} in {checkpoint_dir} is damaged "
          f"({e.reason}); its files are left as they are (later saves pass "
          f"over step {steps[i]}), trying step {steps[i - 1]}",
          flush=True,
        )
      continue
    if verbose:
      print(f"Resumed from step {steps[i]} in {checkpoint_dir}")
    return state, steps[i]
  raise AssertionError("unreachable: the loop returns or raises")


class Checkpointer:
  """Periodic, atomic background saves for a training loop.

  Orbax's asynchronous checkpointing copies the arrays to host memory before
  :meth:`maybe_save` returns and writes them while training goes on; the
  next save and :meth:`close` wait for it. Each save first proves the folder
  writable (:class:`CheckpointWriteError` at the save that meets it).

  Saves at multiples of ``every``; ``config`` is saved with every step.

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
    self.directory, self.every = absolute(directory), int(every)
    self.config = normalise_config(config)
    self._manager = _manager(self.directory, max_to_keep, asynchronous=True)

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves when ``step`` is a multiple of ``every`` (or ``force``) and new:
    a step already in the folder (even a damaged one) is never overwritten."""
    step = int(step)
    if not force and step % self.every:
      return False
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      return False
    check_writable(self.directory, step)
    _write(self._manager, step, state, self.config)
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
  """Adds ``--checkpoint-dir`` and ``--checkpoint-every`` to a CLI parser."""
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
