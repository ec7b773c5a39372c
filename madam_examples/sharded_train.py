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
multiply to the number of devices; one size may be ``-1`` (the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Sequence

from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from madam_examples import cli
from madam_examples import data
from madam_examples import memory
from madam_examples import mesh as mesh_lib
from madam_examples import models
from madam_examples import optimizers
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


def setup(config: Config, devices: Sequence[Any] | None = None) -> Setup:
  """Builds the sharded model, optimizer and jitted steps on a mesh.

  Parameters are created under ``jax.set_mesh`` with the Transformer's
  ``Partitioning.fsdp`` annotations and are sharded as they are created
  (eagerly here: each tensor is drawn whole, then split; a model too large
  for one device is created inside a jitted function instead, as in Flax's
  sharding guide). The optimizer's ``init`` then creates Madam's second
  moment (and Adam's moments for the additive leaves) with the same
  shardings, and the per-tensor bounds as replicated scalars.
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  with jax.set_mesh(mesh):
    model = models.CharTransformer(
      len(data.VOCAB),
      config.context,
      config.dim,
      config.layers,
      config.heads,
      partitioning=models.Partitioning.fsdp("fsdp"),
      rngs=nnx.Rngs(config.seed),
    )
    graphdef, params = nnx.split(model)
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
    state = step.init_state(params, txs, jax.random.key(config.seed))
  # Whatever is not split over the mesh (the PRNG key, the step count, the
  # per-tensor bounds) is replicated on it.
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(
    state,
    jax.tree.map(
      lambda x: (
        x.sharding if isinstance(x.sharding, NamedSharding) else replicated
      ),
      state,
    ),
  )
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  losses = {
    "model": lambda weights, batch, key: tasks.next_char_loss(
      nnx.merge(graphdef, weights["model"]), batch
    )
  }

  def train_step(state, batch):
    state, metrics = step.train_step(losses, txs, state, batch)
    return state, metrics["model_loss"]

  def eval_loss(state, batch):
    return losses["model"](state.params, batch, None)

  # Shardings pinned in and out: the state keeps its layout step after step.
  train_step = jax.jit(
    train_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, None),
    donate_argnums=0,
  )
  eval_loss = jax.jit(eval_loss, in_shardings=(state_sharding, batch_sharding))
  return Setup(
    mesh,
    graphdef,
    txs,
    state,
    state_sharding,
    batch_sharding,
    train_step,
    eval_loss,
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


def train(
  config: Config, devices: Sequence[Any] | None = None, *, log: Any = None
) -> dict[str, Any]:
  """Trains for ``config.steps`` steps; returns the losses and the final
  (sharded) state."""
  run = setup(config, devices)
  text = data.load_stdlib_text()

  def batch(tokens, index, seed):
    return mesh_lib.device_batch(
      global_batch_rows(tokens, index, config.batch_size, config.context, seed),
      run.batch_sharding,
    )

  valid = batch(text.valid, 0, config.seed + 1)
  state, losses, valid_losses = run.state, [], []
  start = time.perf_counter()
  for index in range(config.steps):
    state, loss = run.train_step(state, batch(text.train, index, config.seed))
    losses.append(loss)
    done = index + 1
    if log and (done % config.log_every == 0 or done == config.steps):
      valid_losses.append((done, float(run.eval_loss(state, valid))))
      log(
        f"step {done:5d}  train loss {float(loss):.3f}  "
        f"valid loss {valid_losses[-1][1]:.3f} nats/char  "
        f"({time.perf_counter() - start:.1f} s)"
      )
  losses = [float(x) for x in losses]
  return {
    "losses": losses,
    "valid_losses": valid_losses,
    "run": run,
    "state": state,
    "final_valid_loss": float(run.eval_loss(state, valid)),
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
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument(
    "--check-collectives",
    action="store_true",
    help="print the collectives XLA compiled into the "
    "train step and into the optimizer update alone",
  )
  return parser.parse_args(argv)


def initialise_runtime(args: argparse.Namespace) -> None:
  """Simulated CPU devices or the multi-host runtime: before any JAX use."""
  if args.simulate_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.simulate_devices)
  if args.distributed or args.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )


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
  check_mesh(args)
  config = Config(
    **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  )
  leader = jax.process_index() == 0

  def log(message: str) -> None:
    if leader:
      print(message, flush=True)

  log(
    f"{jax.process_count()} process(es), {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s); mesh {config.mesh}"
  )
  result = train(config, log=log)
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
