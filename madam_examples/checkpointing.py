"""Checkpoint and resume training states with Orbax, safely under preemption.

A *training state* is any pytree of arrays: typically parameters (float
weights or integer LNS codes), the optimizer state (``madam``, ``lns_madam``
or any Optax chain: plain ``NamedTuple``s of arrays), and the PRNG keys that
drive data sampling and stochastic rounding. Everything needed to continue
bit for bit must be in it; the step number is the checkpoint's name.

Recipe (what ``madam-demo --checkpoint-dir`` does)::

  config = {"optimizer": "madam", "learning_rate": 0.01, "width": 64}
  state = init_state(...)                        # fresh, possibly sharded
  state, start = checkpointing.maybe_restore(checkpoint_dir, state,
                                             config=config)
  with checkpointing.Checkpointer(checkpoint_dir, every=100,
                                  config=config) as ckpt:
    for step in range(start, steps):
      state = train_step(state)
      ckpt.maybe_save(step + 1, state)
    ckpt.maybe_save(steps, state, force=True)

What each piece guarantees:

* **Crash safety.** Orbax writes a step into a temporary folder
  (``<step>.orbax-checkpoint-tmp-<time>``) and only when every array and the
  metadata are written does it write ``commit_success.txt`` and atomically
  rename the folder to ``<step>`` (on file systems without an atomic rename,
  such as object stores, the commit file alone marks completion). Steps are
  listed from finalised folders only, so a save cut short by a crash or a
  preemption is never restored; the previous complete step is.
* **Exact resumption.** Arrays are stored with their dtypes (integer LNS codes
  stay ``int8``/``int16``; typed PRNG keys are stored as their raw ``uint32``
  data and rewrapped on restore) and restored bit for bit.
* **Shardings.** The target of a restore says where every array goes: a live
  (e.g. freshly initialised and sharded) state, or ``jax.ShapeDtypeStruct``s
  with ``sharding=`` (from :func:`abstract_state`); arrays are read straight
  into that layout.
* **Clear mismatch errors.** Before reading any array the checkpoint's tree
  (paths, shapes, dtypes) is compared with the target's, and a ``ValueError``
  names the first path that differs (another optimizer, layer width, LNS
  dtype...). Differences the tree cannot show (a learning rate, the number of
  LNS levels within the same integer dtype) are caught by an optional
  ``config``: a JSON-able dict saved with every step and compared key by key
  on restore.
* **Damaged steps.** A complete step whose files were later lost or garbled
  (its metadata, an array file) is never half-read: :func:`maybe_restore`
  says so and resumes from the previous complete step, leaving the damaged
  step's files where they are (nothing is ever renamed, moved or deleted
  because it could not be read); :func:`restore` of that step raises a
  :class:`DamagedCheckpointError` naming the step and the fix.
* **Saves fail where they happen.** Saves run in the background, so a folder
  that cannot be written would only fail one save later; each save first
  checks that the folder takes a file, and raises a
  :class:`CheckpointWriteError` at that save.
* **Several processes.** With ``jax.distributed`` every process calls the
  same functions in the same order: each writes its own shards of the
  state, and every process reaches the same verdict on a damaged step or an
  unwritable folder.

Reference for the optimizers: Bernstein et al., "Learning compositional
functions via multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax

from madam_examples import checkpoint_store as store
from madam_examples import cli

# Part of this module's interface: the restore targets and the errors.
from madam_examples.checkpoint_store import CheckpointWriteError  # noqa: F401
from madam_examples.checkpoint_store import DamagedCheckpointError  # noqa: F401
from madam_examples.checkpoint_store import abstract_state  # noqa: F401

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
  directory = store.absolute(directory)
  # Listed without a CheckpointManager: with several processes, opening one
  # is a barrier, which every process must reach whatever it finds here.
  return store.finalised_steps(directory)


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
  directory = store.absolute(directory)
  store.check_writable(directory, step)
  manager = store.open_manager(directory, max_to_keep=max_to_keep)
  try:
    if step in manager.all_steps():
      raise ValueError(
        f"step {step} is already saved in {os.fspath(directory)}; restore "
        "it with `maybe_restore`, or save under a new step number."
      )
    store.write_step(manager, step, state, config)
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
  directory = store.absolute(directory)
  steps = all_steps(directory)
  if step is None:
    step = steps[-1] if steps else None
  if step is None or step not in steps:
    raise ValueError(
      f"no complete checkpoint {'' if step is None else f'step {step} '}in "
      f"{os.fspath(directory)} (complete steps: {steps})."
    )
  manager = store.open_manager(directory, read_only=True)
  try:
    return store.read_step(manager, directory, step, target, config)
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
    checkpoint_dir = store.absolute(checkpoint_dir)
  steps = all_steps(checkpoint_dir) if checkpoint_dir is not None else []
  if checkpoint_dir is not None:
    store.check_same_steps(checkpoint_dir, steps)
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
    self.directory = store.absolute(directory)
    self.every = int(every)
    self.config = store.normalise_config(config)
    self._manager = store.open_manager(
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
    store.check_writable(self.directory, step)
    store.write_step(self._manager, step, state, self.config)
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
