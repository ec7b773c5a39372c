"""Checkpoint and resume training states with Orbax, safely under preemption.

A training state is any pytree of arrays (parameters, LNS codes, optimizer
states, typed PRNG keys); the step number names the checkpoint::

  state, start = checkpointing.maybe_restore(ckpt_dir, state, config=config)
  with checkpointing.Checkpointer(ckpt_dir, every=100, config=config) as ckpt:
    for step in range(start, steps):
      state = train_step(state)
      ckpt.maybe_save(step + 1, state)
    ckpt.maybe_save(steps, state, force=True)

Orbax saves atomically, lists the complete steps and keeps ``max_to_keep``.
Added here: the saved ``config`` and tree are checked before any array is
read; a damaged step is passed over and its files left where they are; each
save first proves the folder writable; every process reaches the same
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


# ----------------------------------------------------------------- checks


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _typed_keys(target: Any, restored: Any) -> Any:
  """Typed PRNG keys where ``target`` has them (steps saved by earlier
  versions of this module hold their raw data)."""

  def rewrap(t, x):
    if not _is_key(t) or _is_key(x):
      return x
    impl: list[Any] = []
    jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), t)
    key = jax.random.wrap_key_data(x, impl=impl[0])
    sharding = getattr(t, "sharding", None)
    return key if sharding is None else jax.device_put(key, sharding)

  return jax.tree.map(rewrap, target, restored)


def _signatures(tree: Any) -> dict[str, str]:
  """``dtype[shape]`` of each leaf, by dotted path (a typed PRNG key as the
  raw data Orbax stores)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(x, "dtype"):
      x = np.asarray(x)
    elif _is_key(x):
      x = jax.eval_shape(jax.random.key_data, x)
    name = ".".join(ocp.tree.str_keypath(path))
    out[name] = f"{np.dtype(x.dtype).name}{list(x.shape)}"
  return out


def _settings(config: dict[str, Any]) -> dict[str, str]:
  """Each setting as it reads back from JSON (tuples become lists), as text."""
  return {k: repr(v) for k, v in json.loads(json.dumps(config)).items()}


def _check_same(saved: dict, wanted: dict, where: str, what: str) -> None:
  """Raises ``ValueError`` naming each key where the two dicts differ."""
  show = lambda d, k: d[k] if k in d else "(not set)"
  diffs = [
    f"{k}: checkpoint {show(saved, k)}, this run {show(wanted, k)}"
    for k in sorted(set(saved) | set(wanted))
    if saved.get(k) != wanted.get(k)
  ]
  if diffs:
    more = f"; {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise ValueError(
      f"{where} was written with another {what} ({'; '.join(diffs[:3])}"
      f"{more}). Resume with the configuration that wrote it, or use a new "
      "checkpoint folder."
    )


def _verdict(problem: str | None, what: str) -> str | None:
  """The first problem any process met: every process gets the same."""
  ok = processes.gather([problem is None]).ravel()
  if problem is None and not ok.all():
    return f"process {int(np.argmin(ok))} {what}"
  return problem


def _check_writable(directory: str, step: int) -> None:
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
  """The complete checkpoint steps in ``directory``, ascending, listed by
  Orbax without a manager (whose opening is a barrier): a save cut short
  is not a step."""
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

  ``target``: a live state, or ``jax.ShapeDtypeStruct``s with the shardings
  to restore onto; every setting of ``config`` that differs from the saved
  one is an error.

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
    saved = (meta.get("custom_metadata") or {}).get("config")
    if config is not None and saved is not None:
      _check_same(_settings(saved), _settings(config), where, "configuration")
    item = path / str(step) / "default"
    stored = _signatures(handler.metadata(item).tree)
    _check_same(stored, _signatures(target), where, "model or optimizer")
    result = handler.restore(item, args=ocp.args.StandardRestore(target))
    result = _typed_keys(target, result)
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
    seen = processes.gather([steps[-1] if steps else -1, len(steps)])
    if (seen != seen[0]).any():
      views = ", ".join(f"process {i}: {s}" for i, s in enumerate(seen[:, 0]))
      raise ValueError(
        f"the processes see different checkpoints in {checkpoint_dir} "
        f"(latest step {views}). On several hosts, put the folder on a file "
        "system they all share."
      )
  leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  abstract = [p for p, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
  if not steps and abstract:
    raise ValueError(
      f"no complete checkpoint in {checkpoint_dir} to fill the abstract "
      f"target (leaf {jax.tree_util.keystr(abstract[0])} is a "
      "jax.ShapeDtypeStruct); pass a freshly initialised state to start "
      "from step 0."
    )
  if not steps:
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
    config = None if config is None else json.loads(json.dumps(config))
    self.metadata = {"config": config}
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
    _check_writable(self.directory, step)
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
  add = parser.add_argument_group("checkpointing (Orbax)").add_argument
  add("--checkpoint-dir", type=cli.output_dir,
      help="save checkpoints here, and resume from the latest complete one "
      "(proven writable before training starts)")  # fmt: skip
  add("--checkpoint-every", type=cli.positive_int, default=DEFAULT_EVERY,
      help=f"steps between checkpoints (default {DEFAULT_EVERY}); the last "
      "step is always saved")  # fmt: skip
