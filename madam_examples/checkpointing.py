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
listed), lists the complete steps and keeps ``max_to_keep``. Added here: the
saved ``config`` and tree are checked before any array is read; a damaged
latest step is passed over and its files left where they are; each save
first proves the folder writable; every JAX process reaches the same
verdict. More: ``docs/checkpointing.md``.
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

  def __init__(self, directory: str, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(
      f"checkpoint step {step} in {directory} is damaged ({reason}). Move or "
      f"delete the folder {os.path.join(directory, str(step))} (a rerun then "
      "resumes from the previous complete step, or from step 0 if there is "
      "none), or restore it from a copy."
    )


class CheckpointWriteError(OSError):
  """A checkpoint folder that this process cannot write into."""


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def abstract_state(state: Any, shardings: Any = None) -> Any:
  """The restore target for ``state`` (live, or ``jax.ShapeDtypeStruct``s):
  shapes, dtypes and its shardings, or ``shardings`` for another layout.

  Example:
    >>> import jax.numpy as jnp
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
      if hasattr(x, "dtype")
      else x
      for x, s in zip(leaves, targets)
    ]
  )


# ----------------------------------------------------------------- checks


def _signatures(tree: Any) -> dict[str, str]:
  """``dtype[shape]`` of each leaf, by dotted path (a typed PRNG key as the
  raw data Orbax stores)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(x, "dtype"):
      x = np.asarray(x)
    elif jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.eval_shape(jax.random.key_data, x)
    name = ".".join(ocp.tree.str_keypath(path))
    out[name] = f"{np.dtype(x.dtype).name}{list(x.shape)}"
  return out


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
  saved, wanted = _signatures(saved_tree), _signatures(target)
  for name in sorted(set(saved) | set(wanted)):
    if saved.get(name) != wanted.get(name):
      raise ValueError(
        f"{where} does not match the target state at '{name}': the "
        f"checkpoint holds {saved.get(name, 'nothing')}, the target expects "
        f"{wanted.get(name, 'nothing')}. It was written by another model or "
        "optimizer: resume with that configuration, or use a new folder."
      )


def _normalise_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
  """``config`` as it reads back from JSON (tuples become lists...)."""
  if config is None:
    return None
  try:
    return json.loads(json.dumps(dict(config), sort_keys=True))
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"config must be JSON-able (a dict of numbers, strings, lists): {e}."
    ) from e


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
  wanted = _normalise_config(wanted) or {}
  fmt = lambda d, k: repr(d[k]) if k in d else "(not set)"
  diffs = [
    f"{k}: checkpoint {fmt(saved, k)}, this run {fmt(wanted, k)}"
    for k in sorted(set(saved) | set(wanted))
    if saved.get(k, KeyError) != wanted.get(k, KeyError)
  ]
  if diffs:
    raise ValueError(
      f"{where} was written with another configuration ({'; '.join(diffs)})."
      " Resume with that configuration, or use a new checkpoint folder."
    )


def _verdict(problem: str | None, what: str) -> str | None:
  """The first problem any process met: every process gets the same."""
  ok = processes.gather(np.array([problem is None])).ravel()
  if problem is None and not ok.all():
    return f"process {int(np.argmin(ok))} {what}"
  return problem


def check_writable(directory: str, step: int) -> None:
  """Raises :class:`CheckpointWriteError` unless ``directory`` takes a file
  on every process (a background save would fail one save later)."""
  problem = None
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    problem = e.strerror or _one_line(e)
  problem = _verdict(problem, "cannot write there")
  if problem is not None:
    raise CheckpointWriteError(
      f"cannot save checkpoint step {step} in {directory}: {problem}. Make "
      "the folder writable (or free space on its disk), or save into "
      "another folder (--checkpoint-dir)."
    )


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
  return sorted(ocp.utils.checkpoint_steps(os.path.abspath(directory)))


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
  with Checkpointer(directory, max_to_keep=max_to_keep, config=config) as c:
    if not c.maybe_save(step, state, force=True):
      raise ValueError(
        f"step {step} is already saved in {c.directory}; restore it with "
        "`maybe_restore`, or save under a new step number."
      )
  return os.path.join(c.directory, str(step))


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
    ValueError: no such checkpoint, or its config or tree differs.
  """
  directory = os.path.abspath(directory)
  steps = all_steps(directory)
  step = steps[-1] if step is None and steps else step
  if step is None or step not in steps:
    which = "" if step is None else f"step {step} "
    raise ValueError(
      f"no complete checkpoint {which}in {directory} (complete steps: {steps})."
    )
  where, path = f"checkpoint step {step} in {directory}", epath.Path(directory)
  # A handler, not a manager (whose opening is a barrier): a process that
  # fails here still reaches the verdict shared by all processes.
  handler, damage, result = ocp.StandardCheckpointHandler(), None, None
  try:
    meta = json.loads((path / str(step) / "_CHECKPOINT_METADATA").read_bytes())
    if config is not None:
      saved = (meta.get("custom_metadata") or {}).get("config")
      check_config(saved, config, where)
    item = path / str(step) / "default"
    check_compatible(handler.metadata(item).tree, target, where)
    args = ocp.args.StandardRestore(abstract_state(target))
    result = handler.restore(item, args=args)
  except (AttributeError, OSError, LookupError, ValueError) as e:
    if str(e).startswith(where):  # a config or tree mismatch: not damage
      raise
    damage = f"{type(e).__name__}: {_one_line(e)}"
  finally:
    handler.close()
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

  A damaged step is passed over (a message says so, its files stay where
  they are) and the previous one tried; with none left, the error is
  raised. Returns ``(state, step)``, or ``(target, 0)`` when
  ``checkpoint_dir`` is ``None`` or holds no complete step (an abstract
  target is then an error). ``verbose`` prints where training resumes from.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)[1]
    0
    >>> _ = save(d, 5, {'w': jnp.ones(2)})
    >>> maybe_restore(d, {'w': jnp.zeros(2)}, verbose=False)
    ({'w': Array([1., 1.], dtype=float32)}, 5)
  """
  steps: list[int] = []
  if checkpoint_dir is not None:
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    steps = all_steps(checkpoint_dir)
    seen = processes.gather(np.array([steps[-1] if steps else -1, len(steps)]))
    if (seen != seen[0]).any():
      views = ", ".join(f"process {i}: {s}" for i, s in enumerate(seen[:, 0]))
      raise ValueError(
        f"the processes see different checkpoints in {checkpoint_dir} "
        f"(latest step {views}). On several hosts, put the folder on a file "
        "system they all share."
      )
  if not steps:
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
      if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(
          f"no complete checkpoint in {checkpoint_dir} to fill the abstract "
          f"target (leaf {jax.tree_util.keystr(path)} is a "
          "jax.ShapeDtypeStruct); pass a freshly initialised state to start "
          "from step 0."
        )
    if verbose and checkpoint_dir is not None:
      print(f"No checkpoint in {checkpoint_dir}, starting from step 0")
    return target, 0
  for step, earlier in zip(steps[::-1], [*steps[-2::-1], None]):
    try:
      state = restore(checkpoint_dir, target, step, config=config)
      break
    except DamagedCheckpointError as e:
      if earlier is None:
        raise
      if verbose:
        print(
          f"Checkpoint step {step} in {checkpoint_dir} is damaged "
          f"({e.reason}); its files are left as they are (later saves pass "
          f"over step {step}), trying step {earlier}",
          flush=True,
        )
  if verbose:
    print(f"Resumed from step {step} in {checkpoint_dir}")
  return state, step


class Checkpointer:
  """Periodic, atomic background saves for a training loop.

  Orbax copies the arrays to host memory before :meth:`maybe_save` returns
  and writes them while training goes on; the next save and :meth:`close`
  wait for it. Saves at multiples of ``every``, each with ``config``.

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
    self.directory, self.every = os.path.abspath(directory), int(every)
    self.metadata = {"config": _normalise_config(config)}
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, cleanup_tmp_directories=True
      ),
    )

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves when ``step`` is a multiple of ``every`` (or ``force``) and new:
    a step already in the folder (even a damaged one) is never overwritten.

    Raises:
      CheckpointWriteError: the folder does not take a file (on any process).
    """
    step = int(step)
    if not force and step % self.every:
      return False
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      return False
    check_writable(self.directory, step)
    args = ocp.args.StandardSave(state)
    self._manager.save(
      step, args=args, force=True, custom_metadata=self.metadata
    )
    return True

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
