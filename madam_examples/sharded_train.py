r"""Madam on a device mesh: data parallel plus fully sharded (FSDP) training.

The examples' causal Transformer (Flax NNX,
:class:`madam_examples.models.CharTransformer`) learns characters of offline
text (the docstrings of Python's own standard library,
:func:`madam_examples.data.load_stdlib_text`) with Madam (arXiv:2006.14560)
on a ``jax.sharding.Mesh`` (:mod:`madam_examples.mesh`) with two axes:

* ``data``: the batch is split over it (data parallelism);
* ``fsdp``: the batch is split over it too, and every parameter tensor and
  its optimizer state are split along one dimension over it, so each device
  holds ``1/fsdp`` of the model and of the optimizer state (fully sharded data
  parallelism, as in ZeRO-3 / PyTorch FSDP). XLA inserts the all-gathers of
  the parameters in the forward pass and the reduce-scatters of the gradients.

Madam's update needs nothing more: it is elementwise, and its only per-tensor
quantity, the magnitude bound ``p_scale * sqrt(mean(w0**2))`` (SPEC step 1),
is computed once, at ``init``. So the compiled optimizer update contains no
cross-device collective (``--check-collectives`` prints what XLA compiled),
unlike LAMB, LARS or Fromage whose per-tensor norms need an all-reduce every
step. Zero-initialised biases and LayerNorm offsets, which a multiplicative
update cannot move, are trained by Adam through
``madam_optax.with_additive_fallback``.

Single host (8 simulated CPU devices here; on a GPU host or a TPU VM the same
command without ``--simulate-devices`` uses the real accelerators)::

  python -m madam_examples.sharded_train --mesh data=2,fsdp=4 \
      --simulate-devices 8

Multi-host (a TPU pod slice, or several GPU hosts): run the same command on
every host; ``jax.distributed.initialize`` joins the processes into one JAX
runtime before anything else touches JAX, and ``jax.devices()`` is then the
global device list. On Cloud TPU, SLURM or Open MPI the coordinator is found
automatically::

  python -m madam_examples.sharded_train --distributed --mesh data=4,fsdp=8

elsewhere name it (process 0's address) and number the processes::

  # on host i of N (i = 0 .. N-1):
  python -m madam_examples.sharded_train --mesh data=2,fsdp=16 \
      --coordinator-address host0:12345 --num-processes N --process-id i

Each process builds only its own rows of every global batch
(``jax.make_array_from_process_local_data``), so the global batch, and hence
the run, is the same whatever the number of hosts. ``--mesh`` sizes must
multiply to the number of devices; one size may be ``-1`` (the rest). Only
process 0 logs. A process that does not reach the coordinator within
``--initialization-timeout`` seconds makes the others stop with one line.

Several processes on one machine (CPU devices, collectives over Gloo):
:mod:`madam_examples.launch_local` starts them on a free local port and stops
them all if one dies::

  python -m madam_examples.launch_local -n 2 -- --mesh data=2,fsdp=2 \
      --simulate-devices 2

Preemption: ``--checkpoint-dir DIR --checkpoint-every S`` saves the training
state every ``S`` steps and at the end (every process writes its own shards,
with Orbax); the same command resumes from the latest complete step, on the
same mesh or another (another number of processes or devices, other mesh
sizes): the arrays are read straight into the new layout. ``--metrics-out
FILE`` writes what a run did as JSON (process 0): steps, losses, final
validation loss, skipped steps, and per-leaf checksums (float64 sums of
absolute values) of the parameters and the optimizer state, so runs can be
compared from outside.

Bad steps: a step whose loss or gradient is not finite on any process is
skipped on every process (the check is one global value of the jitted
step), so neither the weights nor Madam's second moment ever see it; skips
are counted and logged, and ``--max-bad-steps M`` consecutive ones stop the
run with one line, keeping the last checkpoint (written only after applied
updates). ``--inject-nan-steps 3,7 --inject-nan-process 1`` makes process 1's
rows of the batch give a NaN loss and gradients at steps 3 and 7: a testing
aid for this path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from madam_examples import checkpointing
from madam_examples import cli
from madam_examples import data
from madam_examples import memory
from madam_examples import mesh as mesh_lib
from madam_examples import models
from madam_examples import optimizers
from madam_examples import processes
from madam_examples import step
from madam_examples import tasks


@dataclasses.dataclass(frozen=True)
class Config:
  """Model and training settings (command-line flags of the same names)."""

  mesh: str = "data=2,fsdp=4"
  steps: int = 200
  batch_size: int = 32  # global, over all devices and hosts
  context: int = 64
  dim: int = 64
  heads: int = 4
  layers: int = 2
  learning_rate: float = 0.01  # Madam's rate; the paper's best everywhere
  p_scale: float = 2.0  # the paper's value for its Transformer
  additive_learning_rate: float = 1e-3  # Adam, for zero-initialised leaves
  seed: int = 0
  log_every: int = 50


# Settings that a checkpoint must agree with to be resumed: all but the mesh
# (a resume may change the layout), the length and the logging.
RESUMABLE_CHANGES = ("mesh", "steps", "log_every")


def checkpoint_config(config: Config) -> dict[str, Any]:
  """The settings saved with every checkpoint and checked on resume."""
  return {
    k: v
    for k, v in dataclasses.asdict(config).items()
    if k not in RESUMABLE_CHANGES
  }


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run is carried out, beyond the model and training settings.

  Attributes:
    checkpoint_dir: save the training state here and resume from it.
    checkpoint_every: steps between checkpoints (the last step is saved too).
    max_bad_steps: stop after this many consecutive skipped steps.
    inject_nan_steps: testing aid: the steps (1-based) whose loss and
      gradients are made NaN on ``inject_nan_process``'s rows of the batch.
    inject_nan_process: the process that injects them.
  """

  checkpoint_dir: str | None = None
  checkpoint_every: int = checkpointing.DEFAULT_EVERY
  max_bad_steps: int = 10
  inject_nan_steps: tuple[int, ...] = ()
  inject_nan_process: int = 0


class BadStepsError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def check_config(config: Config, mesh: jax.sharding.Mesh) -> None:
  """Raises ``InputError`` if the mesh cannot split the model or the batch.

  ``Partitioning.fsdp`` splits every tensor along a dimension of size
  ``dim`` or ``4 * dim``; attention splits ``dim`` into ``heads``; every
  device takes an equal share of the global batch.
  """
  fsdp = mesh.shape["fsdp"]
  if config.dim % config.heads:
    raise cli.InputError(
      f"--dim {config.dim} is not a multiple of --heads {config.heads}."
    )
  if config.dim % fsdp:
    raise cli.InputError(
      f"--dim {config.dim} must be a multiple of the fsdp mesh size {fsdp}, "
      "which splits every parameter tensor along it."
    )
  if config.batch_size % mesh.size:
    raise cli.InputError(
      f"--batch-size {config.batch_size} must be a multiple of the "
      f"{mesh.size} devices of the mesh, which split every batch."
    )


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built on a mesh."""

  mesh: jax.sharding.Mesh
  graphdef: Any
  txs: dict[str, optax.GradientTransformation]
  state: step.TrainState  # params, optimizer states, key, step: sharded
  state_sharding: Any
  batch_sharding: NamedSharding
  train_step: Any  # jitted (state, batch) -> (state, loss)
  eval_loss: Any  # jitted (state, batch) -> loss
  # jitted (state, batch) -> (state, loss, applied); and the same with a
  # third argument, NaN in the rows of the batch to poison (testing aid).
  checked_step: Any
  poisoned_step: Any


def _model(
  config: Config, partitioning: models.Partitioning | None
) -> models.CharTransformer:
  return models.CharTransformer(
    len(data.VOCAB),
    config.context,
    config.dim,
    config.layers,
    config.heads,
    partitioning=partitioning,
    rngs=nnx.Rngs(config.seed),
  )


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


def _global(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` (whole, on this process) as a global array of that sharding: each
  process fills only its own devices' shards."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
      _global(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
    )
  host = np.asarray(x)
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: host[index]
  )


def setup(config: Config, devices: Sequence[Any] | None = None) -> Setup:
  """Builds the sharded model, optimizer and jitted steps on a mesh.

  The initial state (parameters, Madam's second moment and per-tensor
  bounds, Adam's moments for the additive leaves) is computed whole on this
  process's first device, the same on every process (same seeds), and then
  laid out on the mesh: each parameter as the Transformer's
  ``Partitioning.fsdp`` annotations say, its optimizer state likewise
  (:func:`state_shardings`), the scalars replicated. Each process fills only
  its own devices, so building the state needs no communication between
  processes. (A model too large for one device is created inside a jitted
  function instead, as in Flax's sharding guide.)
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  with jax.default_device(jax.local_devices()[0]):
    _, params = nnx.split(_model(config, None))
    params = {"model": nnx.as_pure(params)}
    txs = {
      "model": optimizers.make_optimizer(
        "madam",
        config.learning_rate,
        params["model"],
        p_scale=config.p_scale,
        additive_learning_rate=config.additive_learning_rate,
      )
    }
    whole = step.init_state(params, txs, jax.random.key(config.seed))
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(
      lambda: _model(config, models.Partitioning.fsdp("fsdp"))
    )
    graphdef, abstract_params = nnx.split(abstract)
    specs = nnx.as_pure(nnx.get_partition_spec(abstract_params))
  replicated = NamedSharding(mesh, P())
  param_shardings = {
    "model": jax.tree.map(
      lambda spec: NamedSharding(mesh, spec),
      specs,
      is_leaf=lambda x: isinstance(x, P),
    )
  }
  state_sharding = state_shardings(whole, param_shardings, replicated)
  state = jax.tree.map(_global, whole, state_sharding)
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  tx = txs["model"]

  def loss_fn(weights, batch, poison=None):
    loss = tasks.next_char_loss(nnx.merge(graphdef, weights["model"]), batch)
    if poison is not None:  # 0, or NaN from the poisoned rows
      loss = loss * (1.0 + jnp.sum(poison))
    return loss

  def checked_step(state, batch, poison=None):
    """One step, skipped (weights and optimizer state kept) when the loss
    or any gradient is not finite; ``applied`` says which. Under ``jit``
    the check is one global value: every process takes the same branch."""
    weights = state.params["model"]
    loss, grads = jax.value_and_grad(
      lambda w: loss_fn({"model": w}, batch, poison)
    )(weights)
    applied = jnp.isfinite(loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    params, opt_state = step.apply_gradients(
      tx, grads, state.opt_state["model"], weights
    )
    keep = lambda new, old: jnp.where(applied, new, old)
    params = jax.tree.map(keep, params, weights)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state["model"])
    key = jax.random.split(state.key)[0]
    return (
      state._replace(
        params={"model": params},
        opt_state={"model": opt_state},
        key=key,
        step=state.step + 1,
      ),
      loss,
      applied,
    )

  def train_step(state, batch):
    return checked_step(state, batch)[:2]

  def eval_loss(state, batch):
    return loss_fn(state.params, batch)

  # Shardings pinned in and out: the state keeps its layout step after step.
  train_step = jax.jit(
    train_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, None),
    donate_argnums=0,
  )
  rows_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  poisoned_step = jax.jit(
    checked_step,
    in_shardings=(state_sharding, batch_sharding, rows_sharding),
    out_shardings=(state_sharding, replicated, replicated),
    donate_argnums=0,
  )
  checked_step = jax.jit(
    checked_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated, replicated),
    donate_argnums=0,
  )
  eval_loss = jax.jit(
    eval_loss,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=replicated,
  )
  return Setup(
    mesh,
    graphdef,
    txs,
    state,
    state_sharding,
    batch_sharding,
    train_step,
    eval_loss,
    checked_step,
    poisoned_step,
  )


def optimizer_update(run: Setup):
  """The optimizer update alone, ``(state, grads) -> state``, jitted with the
  run's shardings (the train step without the forward and backward passes):
  for inspecting what it compiles to. ``grads`` has the params' structure."""

  def update(state, grads):
    params, opt_state = step.apply_gradients(
      run.txs["model"],
      grads["model"],
      state.opt_state["model"],
      state.params["model"],
    )
    return state._replace(
      params={"model": params}, opt_state={"model": opt_state}
    )

  return jax.jit(
    update,
    in_shardings=(run.state_sharding, run.state_sharding.params),
    out_shardings=run.state_sharding,
  )


def global_batch_rows(
  tokens: np.ndarray, step_index: int, batch_size: int, context: int, seed: int
) -> np.ndarray:
  """The ``step_index``-th global batch of windows (``context + 1`` tokens
  each); the same on every process."""
  rng = np.random.default_rng([seed, step_index])
  starts = rng.integers(0, len(tokens) - context - 1, batch_size)
  return np.stack([tokens[s : s + context + 1] for s in starts])


def local_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, read from this process's first copy (a
  global array spanning other processes cannot be read whole)."""
  return np.asarray(x.addressable_data(0))


def poison_rows(
  sharding: NamedSharding,
  batch_size: int,
  step_number: int,
  options: RunOptions,
) -> jax.Array:
  """Testing aid: a ``(batch_size,)`` global array, zero except on the rows
  held by ``options.inject_nan_process`` at an injected step, where it is NaN.
  Each process builds only its own rows."""
  rows = mesh_lib.local_rows(sharding, (batch_size,))
  poisoned = (
    step_number in options.inject_nan_steps
    and jax.process_index() == options.inject_nan_process
  )
  values = np.full(
    rows.stop - rows.start, np.nan if poisoned else 0.0, np.float32
  )
  return jax.make_array_from_process_local_data(sharding, values, (batch_size,))


def _checkpoint_tree(
  state: step.TrainState, skipped: int, replicated: NamedSharding
) -> dict[str, Any]:
  """What a checkpoint holds: the training state and the skipped count."""
  count = jax.make_array_from_callback(
    (), replicated, lambda _: np.asarray(skipped, np.int32)
  )
  return {"train_state": state, "skipped_steps": count}


def train(
  config: Config,
  devices: Sequence[Any] | None = None,
  *,
  log: Any = None,
  options: RunOptions | None = None,
) -> dict[str, Any]:
  """Trains to ``config.steps`` steps (resuming from a checkpoint if any).

  Args:
    config: the model and training settings.
    devices: the mesh's devices (default: all, on every process).
    log: a ``print``-like function, or ``None``.
    options: checkpointing, bad-step limit, NaN injection.

  Returns:
    A dict: ``losses`` (this run's training losses, from ``resumed_from``
    on), ``valid_losses``, ``final_valid_loss``, ``skipped_steps`` (in all,
    since step 0), ``resumed_from``, ``step_seconds`` (wall time of each
    step here), ``run`` (the :class:`Setup`) and ``state``.

  Raises:
    BadStepsError: after ``options.max_bad_steps`` consecutive skipped steps.
  """
  options = options or RunOptions()
  log = log or (lambda message: None)
  run = setup(config, devices)
  replicated = NamedSharding(run.mesh, P())
  text = data.load_stdlib_text()

  def batch(tokens, index, seed):
    return mesh_lib.device_batch(
      global_batch_rows(tokens, index, config.batch_size, config.context, seed),
      run.batch_sharding,
    )

  valid = batch(text.valid, 0, config.seed + 1)
  # Processes may get here far apart (each built its model op by op); CPU
  # collectives give up after 30 s, so meet before the first one.
  processes.sync("setup")
  state, start, skipped, ckpt, last_saved = run.state, 0, 0, None, None
  if options.checkpoint_dir is not None:
    restored, start = checkpointing.maybe_restore(
      options.checkpoint_dir,
      _checkpoint_tree(state, 0, replicated),
      verbose=jax.process_index() == 0,
      config=checkpoint_config(config),
    )
    state = restored["train_state"]
    skipped = int(local_value(restored["skipped_steps"]))
    last_saved = start or None
    ckpt = checkpointing.Checkpointer(
      options.checkpoint_dir,
      options.checkpoint_every,
      config=checkpoint_config(config),
    )
  # Compiled before the first step, and met after: compiling may take
  # some processes much longer than others.
  first = batch(text.train, start, config.seed)
  if options.inject_nan_steps:
    step_fn = run.poisoned_step.lower(
      state,
      first,
      poison_rows(run.batch_sharding, config.batch_size, 1, options),
    ).compile()
  else:
    step_fn = run.checked_step.lower(state, first).compile()
  eval_fn = run.eval_loss.lower(state, valid).compile()
  processes.sync("compiled")
  losses, valid_losses, seconds, streak = [], [], [], 0
  try:
    for index in range(start, config.steps):
      done = index + 1
      begin = time.perf_counter()
      b = batch(text.train, index, config.seed)
      if options.inject_nan_steps:
        state, loss, applied = step_fn(
          state,
          b,
          poison_rows(run.batch_sharding, config.batch_size, done, options),
        )
      else:
        state, loss, applied = step_fn(state, b)
      applied = bool(local_value(applied))  # the same on every process
      seconds.append(time.perf_counter() - begin)
      losses.append(loss)
      if applied:
        streak = 0
      else:
        skipped, streak = skipped + 1, streak + 1
        log(
          f"step {done:5d}  non-finite loss or gradient: update skipped on "
          f"every process ({skipped} skipped in all)"
        )
        if streak >= options.max_bad_steps:
          kept = (
            f"the last checkpoint, step {last_saved} in "
            f"{options.checkpoint_dir}, is kept"
            if last_saved
            else "no checkpoint was written"
          )
          raise BadStepsError(
            f"stopped at step {done}: {streak} consecutive steps "
            f"({done - streak + 1} to {done}) had a non-finite loss or "
            f"gradient (--max-bad-steps {options.max_bad_steps}); {kept}. "
            "Lower --learning-rate or check the data, then rerun."
          )
      if done % config.log_every == 0 or done == config.steps:
        valid_losses.append((done, float(local_value(eval_fn(state, valid)))))
        log(
          f"step {done:5d}  train loss {float(local_value(loss)):.3f}  "
          f"valid loss {valid_losses[-1][1]:.3f} nats/char  "
          f"({sum(seconds):.1f} s)"
        )
      # Checkpoints only after applied updates: the last one is good.
      if (
        ckpt is not None
        and streak == 0
        and ckpt.maybe_save(
          done,
          _checkpoint_tree(state, skipped, replicated),
          force=done == config.steps,
        )
      ):
        last_saved = done
  finally:
    if ckpt is not None:
      ckpt.close()
  return {
    "losses": [float(local_value(x)) for x in losses],
    "valid_losses": valid_losses,
    "run": run,
    "state": state,
    "final_valid_loss": float(local_value(eval_fn(state, valid))),
    "skipped_steps": skipped,
    "resumed_from": start,
    "step_seconds": seconds,
  }


def leaf_checksums(tree: Any) -> dict[str, float]:
  """Float64 sum of absolute values of each leaf (whole, over processes).

  Each process sums the shards it holds (one copy of each, however
  replicated) and the per-process sums are added in process order, so the
  same layout gives the same bits. A collective with several processes:
  every process must call it.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf_checksums({'w': jnp.array([1.5, -2.0])})
    {"['w']": 3.5}
  """
  names, local = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names.append(jax.tree_util.keystr(path))
    local.append(
      math.fsum(
        float(np.sum(np.abs(np.asarray(shard.data, np.float64))))
        for shard in x.addressable_shards
        if shard.replica_id == 0
      )
    )
  per_process = processes.gather(np.asarray(local, np.float64))
  return {name: math.fsum(per_process[:, i]) for i, name in enumerate(names)}


def gather_ints(value: int) -> list[int]:
  """Every process's ``value``, in process order (a collective).

  Example:
    >>> gather_ints(3)               # one process
    [3]
  """
  values = processes.gather(np.array([value], np.int64))
  return [int(x) for x in values.reshape(-1)]


def run_metrics(config: Config, result: dict[str, Any]) -> dict[str, Any]:
  """What a run did, JSON-able (a collective: every process calls it).

  ``skipped_steps_per_process`` is each process's own count of the steps it
  skipped: equal on every process when the skip decision is global.
  """
  state, run = result["state"], result["run"]
  steps = result["resumed_from"] + len(result["losses"])
  params = leaf_checksums(state.params)
  opt_state = leaf_checksums(state.opt_state)
  times = np.asarray(result["step_seconds"][1:] or result["step_seconds"])
  param_bytes = memory.bytes_per_device(state.params)
  opt_bytes = memory.bytes_per_device(state.opt_state)
  return {
    "steps": steps,
    "resumed_from": result["resumed_from"],
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "mesh": dict(run.mesh.shape),
    "config": dataclasses.asdict(config),
    "parameters": sum(
      math.prod(x.shape) for x in jax.tree.leaves(state.params)
    ),
    "losses": result["losses"],
    "valid_losses": result["valid_losses"],
    "final_valid_loss": result["final_valid_loss"],
    "skipped_steps": result["skipped_steps"],
    "skipped_steps_per_process": gather_ints(result["skipped_steps"]),
    "param_checksum": math.fsum(params.values()),
    "param_checksums": params,
    "opt_state_checksums": opt_state,
    "all_finite": bool(
      all(np.isfinite(v) for v in [*params.values(), *opt_state.values()])
    ),
    "param_bytes_per_device": max(param_bytes.values()),
    "opt_state_bytes_per_device": max(opt_bytes.values()),
    "step_time_ms": {
      "median": float(np.median(times) * 1e3) if len(times) else None,
      "q1": float(np.percentile(times, 25) * 1e3) if len(times) else None,
      "q3": float(np.percentile(times, 75) * 1e3) if len(times) else None,
      "first": (
        float(result["step_seconds"][0] * 1e3)
        if result["step_seconds"]
        else None
      ),
    },
  }


# -------------------------------------------------------------- command line


PROG = "python -m madam_examples.sharded_train"


def _flag_type(field: dataclasses.Field) -> Any:
  """The argparse type of a :class:`Config` field: sizes and counts are
  positive, the seed is 0 or more, the rates and scales positive."""
  if field.name == "seed":
    return cli.nonnegative_int
  if isinstance(field.default, int):
    return cli.positive_int
  if isinstance(field.default, float):
    return cli.positive_float
  return type(field.default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Multi-host: see the module docstring "
    "(python -m pydoc madam_examples.sharded_train).",
  )
  helps = {
    "mesh": "AXIS=SIZE,... over the axes data and fsdp; one size may be -1 "
    "(the rest); they multiply to the number of devices",
    "batch_size": "global batch, over all devices and hosts",
    "learning_rate": "Madam's learning rate",
    "p_scale": "Madam's magnitude bound, in initial RMS of each tensor",
    "additive_learning_rate": "Adam's, for the zero-initialised leaves",
  }
  for field in dataclasses.fields(Config):
    parser.add_argument(
      "--" + field.name.replace("_", "-"),
      type=_flag_type(field),
      default=field.default,
      help=f"{helps.get(field.name, '')} (default {field.default})".strip(),
    )
  parser.add_argument(
    "--simulate-devices",
    type=cli.positive_int,
    default=None,
    help="split the host CPU into this many JAX devices "
    "(testing a mesh without accelerators)",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() (auto-detects "
    "Cloud TPU, SLURM, Open MPI)",
  )
  parser.add_argument(
    "--coordinator-address",
    default=None,
    help="host:port of process 0 (multi-host)",
  )
  parser.add_argument("--num-processes", type=cli.positive_int, default=None)
  parser.add_argument("--process-id", type=cli.nonnegative_int, default=None)
  parser.add_argument(
    "--check-collectives",
    action="store_true",
    help="print the collectives XLA compiled into the "
    "train step and into the optimizer update alone",
  )
  add_run_arguments(parser)
  return parser.parse_args(argv)


def _step_list(text: str) -> tuple[int, ...]:
  try:
    steps = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    steps = ()
  if not steps or min(steps) < 1:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated step numbers >= 1, e.g. 3,7; got {text!r}"
    )
  return steps


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of multi-process runs, checkpoints, metrics and bad steps."""
  parser.add_argument(
    "--initialization-timeout",
    type=cli.positive_int,
    default=300,
    help="seconds to wait for every process at the coordinator before "
    "stopping with an error (default 300)",
  )
  checkpointing.add_arguments(parser)
  parser.add_argument(
    "--metrics-out",
    type=cli.output_file,
    default=None,
    help="write the run's figures as JSON here (process 0): steps, "
    "losses, final validation loss, skipped steps, per-leaf "
    "checksums of parameters and optimizer state",
  )
  parser.add_argument(
    "--max-bad-steps",
    type=cli.positive_int,
    default=RunOptions.max_bad_steps,
    help="stop after this many consecutive steps with a non-finite loss "
    f"or gradient (default {RunOptions.max_bad_steps})",
  )
  group = parser.add_argument_group("testing aids")
  group.add_argument(
    "--inject-nan-steps",
    type=_step_list,
    default=(),
    help="make the loss and gradients NaN at these steps (e.g. 3,7) on "
    "the rows of the batch of --inject-nan-process, to exercise the "
    "skipping of bad steps",
  )
  group.add_argument(
    "--inject-nan-process",
    type=cli.nonnegative_int,
    default=0,
    help="the process that injects them (default 0)",
  )


def shared_settings(config: Config, args: argparse.Namespace) -> dict:
  """What every process of a run must be started with: all but
  ``--metrics-out`` (where a process writes) and the process's own id."""
  return {
    **dataclasses.asdict(config),
    **dataclasses.asdict(run_options(args)),
    "simulate_devices": args.simulate_devices,
  }


def run_options(args: argparse.Namespace) -> RunOptions:
  """The :class:`RunOptions` of parsed command-line flags."""
  return RunOptions(
    checkpoint_dir=args.checkpoint_dir,
    checkpoint_every=args.checkpoint_every,
    max_bad_steps=args.max_bad_steps,
    inject_nan_steps=tuple(args.inject_nan_steps),
    inject_nan_process=args.inject_nan_process,
  )


def _cpu_platform(args: argparse.Namespace) -> bool:
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return bool(args.simulate_devices) or platforms == "cpu"


class _Deadline:
  """Ends the process with one line if a block does not finish in time.

  JAX's own timeout on the coordinator aborts the process with a C++ stack
  trace; this fires first, prints ``message`` on stderr and exits with
  status 2.
  """

  def __init__(self, seconds: float, message: str):
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True
    self._message = message

  def _expire(self) -> None:
    sys.stdout.flush()
    print(self._message, file=sys.stderr, flush=True)
    os._exit(2)

  def __enter__(self) -> _Deadline:
    self._timer.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._timer.cancel()


def initialise_runtime(args: argparse.Namespace) -> None:
  """Simulated CPU devices or the multi-host runtime: before any JAX use.

  With several processes on CPU devices, their collectives go over Gloo
  (TCP). Every process must reach the coordinator within
  ``args.initialization_timeout`` seconds, or each stops with one line.
  """
  if args.simulate_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.simulate_devices)
  if args.distributed or args.coordinator_address:
    if _cpu_platform(args):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = getattr(args, "initialization_timeout", 300)
    who = (
      "this process"
      if args.process_id is None
      else f"process {args.process_id} of {args.num_processes}"
    )
    where = args.coordinator_address or "the auto-detected coordinator"
    message = (
      f"{PROG}: error: {who}: not every process reached the coordinator at "
      f"{where} within {timeout} s (--initialization-timeout). Start every "
      "process with the same --coordinator-address and --num-processes "
      "and its own --process-id (on one machine, python -m "
      "madam_examples.launch_local does it)."
    )
    with _Deadline(timeout, message):
      jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=timeout + 60,
      )


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """Writes ``metrics`` as JSON to ``path`` (atomically)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  os.replace(path + ".tmp", path)


def check_mesh(args: argparse.Namespace) -> None:
  """Raises ``InputError`` unless ``--mesh`` fits the devices JAX sees; the
  message says how to change the device count this run has."""
  hint = (
    f", or change --simulate-devices {args.simulate_devices}"
    if args.simulate_devices
    else ", or pass --simulate-devices N on a CPU host"
  )
  mesh_lib.parse_mesh(args.mesh, jax.device_count(), hint=hint)


def log_memory(state: step.TrainState, log: Any) -> None:
  """The params' and optimizer state's bytes on each of this process's
  devices (every device of a single-process run)."""
  model_bytes = memory.bytes_per_device(state.params)
  opt_bytes = memory.bytes_per_device(state.opt_state)
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


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  initialise_runtime(args)
  config = Config(
    **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  )
  try:
    processes.check_same_settings(
      shared_settings(config, args), args.initialization_timeout
    )
  except processes.ProcessesDisagree as e:
    raise cli.InputError(str(e)) from None
  check_mesh(args)
  leader = jax.process_index() == 0

  def log(message: str) -> None:
    if leader:
      print(message, flush=True)

  log(
    f"{jax.process_count()} process(es), {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s); mesh {config.mesh}"
  )
  try:
    result = train(config, log=log, options=run_options(args))
  except (
    BadStepsError,
    checkpointing.CheckpointWriteError,
    processes.ProcessesDisagree,
    ValueError,
  ) as e:  # damaged or mismatched checkpoints included
    message = " ".join(str(e).split())
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    if isinstance(e, processes.ProcessesDisagree):
      sys.stdout.flush()  # jax.distributed's exit would wait for the
      os._exit(1)  # missing process: stop now
    return 1
  if result["skipped_steps"]:
    log(
      f"{result['skipped_steps']} step(s) skipped in all (non-finite loss "
      "or gradient)"
    )
  run, state = result["run"], result["state"]
  log(
    f"mesh {dict(run.mesh.shape)}; parameters "
    f"{sum(x.size for x in jax.tree.leaves(state.params))}"
  )
  log_memory(state, log)
  if args.check_collectives:
    batch = mesh_lib.device_batch(
      np.zeros((config.batch_size, config.context + 1), np.int32),
      run.batch_sharding,
    )
    step_hlo = run.train_step.lower(state, batch).compile().as_text()
    update_hlo = (
      optimizer_update(run).lower(state, state.params).compile().as_text()
    )
    log(
      f"collectives in the train step: {mesh_lib.collectives_in_hlo(step_hlo)}"
    )
    log(
      "collectives in the optimizer update: "
      f"{mesh_lib.collectives_in_hlo(update_hlo) or 'none'}"
    )
  # Computed on every process whether or not it writes them: run_metrics
  # is a collective, and --metrics-out may be given to process 0 only.
  metrics = run_metrics(config, result)
  if args.check_collectives:
    metrics["collectives"] = {
      "train_step": mesh_lib.collectives_in_hlo(step_hlo),
      "optimizer_update": mesh_lib.collectives_in_hlo(update_hlo),
    }
  if args.metrics_out and leader:
    write_metrics(args.metrics_out, metrics)
    log(f"wrote {args.metrics_out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
