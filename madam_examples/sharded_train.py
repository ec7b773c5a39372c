r"""Madam on a device mesh: data parallel plus fully sharded (FSDP) training.

A causal Transformer (:class:`madam_examples.models.CharTransformer`) learns
the standard library's docstrings with Madam (arXiv:2006.14560) on a mesh:
``data`` splits the batch; ``fsdp`` splits it too, and every parameter and
its optimizer state (ZeRO-3 / FSDP). Madam's update is elementwise, so it
compiles to no collective (``--check-collectives``). Adam trains the
zero-initialised leaves, which a multiplicative update cannot move.

  python -m madam_examples.sharded_train --mesh data=2,fsdp=4 \
      --simulate-devices 8                             # one host
  python -m madam_examples.sharded_train --distributed --mesh data=4,fsdp=8
  python -m madam_examples.launch_local -n 2 -- --mesh data=2,fsdp=2 \
      --simulate-devices 2          # two processes on this machine

Each process builds only its rows of every global batch, so the run is the
same whatever the number of hosts. ``--checkpoint-dir`` saves and resumes
onto the same mesh or another; a step whose loss or gradient is not finite
is skipped on every process. The whole story: ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
import os
import sys
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
from madam_examples import mesh as mesh_lib
from madam_examples import metrics as metrics_lib
from madam_examples import models
from madam_examples import optimizers
from madam_examples import processes
from madam_examples import step
from madam_examples import tasks

PROG = "python -m madam_examples.sharded_train"


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


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Checkpointing (the last step is saved too) and the bad-step limit."""

  checkpoint_dir: str | None = None
  checkpoint_every: int = checkpointing.DEFAULT_EVERY
  max_bad_steps: int = 10


class BadStepsError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def check_config(config: Config, mesh: jax.sharding.Mesh) -> None:
  """Raises ``InputError`` if the mesh cannot split the model or the batch."""
  dim, fsdp, n = config.dim, mesh.shape["fsdp"], mesh.size
  if dim % config.heads:
    message = f"--dim {dim} is not a multiple of --heads {config.heads}."
  elif dim % fsdp:
    message = (f"--dim {dim} must be a multiple of the fsdp mesh size {fsdp}, "
               "which splits every parameter tensor along it.")  # fmt: skip
  elif config.batch_size % n:
    message = (f"--batch-size {config.batch_size} must be a multiple of "
               f"the {n} devices of the mesh, which split every batch.")  # fmt: skip
  else:
    return
  raise cli.InputError(message)


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built on a mesh."""

  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  state: step.TrainState  # params, optimizer states, key, step: sharded
  state_sharding: Any
  batch_sharding: NamedSharding
  train_step: Any  # jitted (state, batch) -> (state, loss, applied)
  eval_loss: Any  # jitted (state, batch) -> loss


def setup(config: Config, devices: Sequence[Any] | None = None) -> Setup:
  """Builds the sharded model, optimizer and jitted steps on a mesh.

  The initial state is computed whole on this process's first device (the
  same on every process); each process then fills only its own devices'
  shards, laid out as the model's ``Partitioning.fsdp`` annotations say.
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  sizes = (config.context, config.dim, config.layers, config.heads)
  model = lambda partitioning: models.CharTransformer(
    len(data.VOCAB), *sizes, partitioning=partitioning,
    rngs=nnx.Rngs(config.seed))  # fmt: skip
  with jax.default_device(jax.local_devices()[0]):
    params = {"model": nnx.as_pure(nnx.split(model(None))[1])}
    tx = optimizers.make_optimizer(
      "madam", config.learning_rate, params["model"], p_scale=config.p_scale,
      additive_learning_rate=config.additive_learning_rate)  # fmt: skip
    whole = step.init_state(params, {"model": tx}, jax.random.key(config.seed))
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(lambda: model(models.Partitioning.fsdp("fsdp")))
    graphdef, abstract_params = nnx.split(abstract)
    specs = nnx.as_pure(nnx.get_partition_spec(abstract_params))
  replicated = NamedSharding(mesh, P())
  is_spec = lambda x: isinstance(x, P)
  named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
  state_sharding = mesh_lib.state_shardings(whole, {"model": named}, replicated)
  state = jax.tree.map(mesh_lib.global_array, whole, state_sharding)
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))

  def loss_fn(weights, batch):
    return tasks.next_char_loss(nnx.merge(graphdef, weights), batch)

  def checked_step(state, batch):
    """One step, skipped (weights and optimizer state kept) when the loss
    or any gradient is not finite; ``applied`` says which. Under ``jit``
    the check is one global value: every process takes the same branch."""
    weights, opt_state = state.params["model"], state.opt_state["model"]
    loss, grads = jax.value_and_grad(loss_fn)(weights, batch)
    finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    applied = jnp.isfinite(loss) & jnp.all(jnp.stack(finite))
    new = step.apply_gradients(tx, grads, opt_state, weights)
    keep = lambda n, o: jax.tree.map(partial(jnp.where, applied), n, o)
    state = state._replace(
      params={"model": keep(new[0], weights)},
      opt_state={"model": keep(new[1], opt_state)},
      key=jax.random.split(state.key)[0],
      step=state.step + 1,
    )
    return state, loss, applied

  # Shardings pinned in and out: the state keeps its layout step after step.
  jit = partial(jax.jit, in_shardings=(state_sharding, batch_sharding))
  outs = (state_sharding, replicated, replicated)
  checked = jit(checked_step, out_shardings=outs, donate_argnums=0)
  evaluate = jit(lambda s, b: loss_fn(s.params["model"], b),
                 out_shardings=replicated)  # fmt: skip
  run = (mesh, tx, state, state_sharding, batch_sharding)
  return Setup(*run, checked, evaluate)


def optimizer_update(run: Setup):
  """The optimizer update alone, ``(state, grads) -> state``, jitted with the
  run's shardings: to inspect what it compiles to (no collective)."""

  def update(state, grads):
    params, opt_state = step.apply_gradients(
      run.tx, grads["model"], state.opt_state["model"], state.params["model"]
    )
    return state._replace(params={"model": params},
                          opt_state={"model": opt_state})  # fmt: skip

  shardings = (run.state_sharding, run.state_sharding.params)
  return jax.jit(update, in_shardings=shardings, out_shardings=shardings[0])


def collectives(config: Config, run: Setup, state: Any) -> dict[str, list]:
  """The collectives XLA compiles into the train step and into the optimizer
  update alone (none: Madam's update is elementwise)."""
  rows = np.zeros((config.batch_size, config.context + 1), np.int32)
  batch = mesh_lib.device_batch(rows, run.batch_sharding)
  lowered = {
    "train_step": run.train_step.lower(state, batch),
    "optimizer_update": optimizer_update(run).lower(state, state.params),
  }
  return {
    k: mesh_lib.collectives_in_hlo(v.compile().as_text())
    for k, v in lowered.items()
  }


def global_batch_rows(
  tokens: np.ndarray, step_index: int, batch_size: int, context: int, seed: int
) -> np.ndarray:
  """The ``step_index``-th global batch: the same on every process."""
  rng = np.random.default_rng([seed, step_index])
  starts = rng.integers(0, len(tokens) - context - 1, batch_size)
  return np.stack([tokens[s : s + context + 1] for s in starts])


def local_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, from this process's first copy."""
  return np.asarray(x.addressable_data(0))


def train(
  config: Config,
  devices: Sequence[Any] | None = None,
  *,
  log: Any = None,
  options: RunOptions | None = None,
) -> dict[str, Any]:
  """Trains to ``config.steps`` steps, resuming from a checkpoint if any.

  Returns ``losses`` (from ``resumed_from`` on), ``valid_losses``,
  ``final_valid_loss``, ``skipped_steps`` (since step 0), ``resumed_from``,
  ``step_seconds``, ``run`` and ``state``; raises :class:`BadStepsError`
  after ``max_bad_steps`` consecutive skipped steps.
  """
  options, log = options or RunOptions(), log or (lambda message: None)
  # What a checkpoint must agree with: all but the mesh (a resume may change
  # the layout), the length and the logging.
  ckpt_config = dataclasses.asdict(config)
  for resumable in ("mesh", "steps", "log_every"):
    del ckpt_config[resumable]
  run, folder = setup(config, devices), options.checkpoint_dir
  sizes = (config.batch_size, config.context)
  replicated = NamedSharding(run.mesh, P())
  text = data.load_stdlib_text()

  def batch(tokens, index, seed):
    rows = global_batch_rows(tokens, index, *sizes, seed)
    return mesh_lib.device_batch(rows, run.batch_sharding)

  def saved(state, skipped):  # what a checkpoint holds
    count = jax.make_array_from_callback(
      (), replicated, lambda _: np.asarray(skipped, np.int32)
    )
    return {"train_state": state, "skipped_steps": count}

  valid = batch(text.valid, 0, config.seed + 1)
  # Processes may get here far apart (each built its model op by op); CPU
  # collectives give up after 30 s, so meet before the first one.
  processes.sync("setup")
  state, start, skipped, ckpt, last_saved = run.state, 0, 0, None, None
  if folder is not None:
    leader = jax.process_index() == 0
    restored, start = checkpointing.maybe_restore(
      folder, saved(state, 0), verbose=leader, config=ckpt_config
    )
    state = restored["train_state"]
    skipped = int(local_value(restored["skipped_steps"]))
    last_saved = start or None
    every = options.checkpoint_every
    ckpt = checkpointing.Checkpointer(folder, every, config=ckpt_config)
  # Compiled before the first step and met after: compiling may take some
  # processes much longer than others.
  first = batch(text.train, start, config.seed)
  step_fn = run.train_step.lower(state, first).compile()
  eval_fn = run.eval_loss.lower(state, valid).compile()
  processes.sync("compiled")
  losses, valid_losses, seconds, streak = [], [], [], 0
  try:
    for done in range(start + 1, config.steps + 1):
      begin = time.perf_counter()
      b = batch(text.train, done - 1, config.seed)
      state, loss, applied = step_fn(state, b)
      applied = bool(local_value(applied))  # the same on every process
      seconds.append(time.perf_counter() - begin)
      losses.append(loss)
      streak = 0 if applied else streak + 1
      if not applied:
        skipped += 1
        log(
          f"step {done:5d}  non-finite loss or gradient: update skipped on "
          f"every process ({skipped} skipped in all)"
        )
      if streak >= options.max_bad_steps:
        kept = f"the last checkpoint, step {last_saved} in {folder}, is kept"
        raise BadStepsError(
          f"stopped at step {done}: {streak} consecutive steps "
          f"({done - streak + 1} to {done}) had a non-finite loss or "
          f"gradient (--max-bad-steps {options.max_bad_steps}); "
          f"{kept if last_saved else 'no checkpoint was written'}. "
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
      if ckpt and not streak:
        last = done == config.steps
        if ckpt.maybe_save(done, saved(state, skipped), force=last):
          last_saved = done
  finally:
    if ckpt is not None:
      ckpt.close()
  losses = [float(local_value(x)) for x in losses]
  return dict(losses=losses, valid_losses=valid_losses, run=run, state=state,
              final_valid_loss=float(local_value(eval_fn(state, valid))),
              skipped_steps=skipped, resumed_from=start, step_seconds=seconds)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  kinds = {str: str, int: cli.positive_int, float: cli.positive_float}
  for field in dataclasses.fields(Config):
    kind = kinds[type(field.default)]
    kind = cli.nonnegative_int if field.name == "seed" else kind
    flag = "--" + field.name.replace("_", "-")
    parser.add_argument(flag, type=kind, default=field.default)
  processes.add_arguments(parser)  # --distributed, --simulate-devices...
  checkpointing.add_arguments(parser)
  add = parser.add_argument
  add("--check-collectives", action="store_true",
      help="print the collectives compiled into step and update")  # fmt: skip
  add("--metrics-out", type=cli.output_file, default=None,
      help="write the run's figures as JSON here (process 0)")  # fmt: skip
  add("--max-bad-steps", type=cli.positive_int, default=10,
      help="stop after this many non-finite steps in a row")  # fmt: skip
  return parser.parse_args(argv)


def check_mesh(args: argparse.Namespace) -> None:
  """Raises ``InputError`` unless ``--mesh`` fits the devices JAX sees."""
  n = args.simulate_devices
  hint = f"change --simulate-devices {n}" if n else "pass --simulate-devices N"
  hint = f", or {hint}" + ("" if n else " on a CPU host")
  mesh_lib.parse_mesh(args.mesh, jax.device_count(), hint=hint)


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  processes.initialise_runtime(args, PROG)
  config = Config(*(getattr(args, f.name) for f in dataclasses.fields(Config)))
  options = RunOptions(
    args.checkpoint_dir, args.checkpoint_every, args.max_bad_steps
  )
  shared = {**dataclasses.asdict(config), **dataclasses.asdict(options)}
  shared["simulate_devices"] = args.simulate_devices
  try:
    # All but --metrics-out (where a process writes) must agree.
    processes.check_same_settings(shared, args.initialization_timeout)
  except processes.ProcessesDisagree as e:
    raise cli.InputError(str(e)) from None
  check_mesh(args)
  leader = jax.process_index() == 0
  log = lambda message: print(message, flush=True) if leader else None
  log(
    f"{jax.process_count()} process(es), {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s); mesh {config.mesh}"
  )
  try:
    result = train(config, log=log, options=options)
  except (BadStepsError, OSError, processes.ProcessesDisagree, ValueError) as e:
    message = " ".join(str(e).split())
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    if isinstance(e, processes.ProcessesDisagree):
      sys.stdout.flush()  # jax.distributed's exit would wait for the
      os._exit(1)  # missing process: stop now
    return 1
  # Computed on every process whether or not it writes them: run_metrics
  # is a collective, and --metrics-out may be given to process 0 only.
  metrics = metrics_lib.run_metrics(config, result)
  if args.check_collectives:
    metrics["collectives"] = collectives(config, result["run"], result["state"])
  metrics_lib.log_summary(metrics, result["state"], log)
  if args.metrics_out and leader:
    metrics_lib.write_metrics(args.metrics_out, metrics)
    log(f"wrote {args.metrics_out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
