r"""Madam on a device mesh: data parallel plus fully sharded (FSDP) training.

A small causal Transformer (Flax NNX) learns characters of offline text (the
docstrings of Python's own standard library) with Madam
(arXiv:2006.14560) on a ``jax.sharding.Mesh`` with two axes:

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
import importlib
import math
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import madam_optax

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")      # the batch is split over every device
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter",
               "collective-permute", "all-to-all")
VOCAB = 128                        # ASCII code points
CORPUS_MODULES = ("argparse", "collections", "functools", "inspect",
                  "itertools", "json", "os", "pathlib", "re", "string",
                  "textwrap", "typing", "unittest", "logging", "subprocess")


@dataclasses.dataclass(frozen=True)
class Config:
  """Model and training settings (command-line flags of the same names)."""
  mesh: str = "data=2,fsdp=4"
  steps: int = 200
  batch_size: int = 32             # global, over all devices and hosts
  context: int = 64
  dim: int = 64
  heads: int = 4
  layers: int = 2
  learning_rate: float = 0.01      # Madam's rate; the paper's best everywhere
  p_scale: float = 2.0             # the paper's value for its Transformer
  additive_learning_rate: float = 1e-3   # Adam, for zero-initialised leaves
  seed: int = 0
  log_every: int = 50


# ------------------------------------------------------------------- mesh


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (a missing axis is 1).

  One size may be ``-1``: it takes the devices the others leave. Raises
  ``ValueError`` for unknown axes, bad sizes, or a product that is not
  ``num_devices``.
  """
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for item in filter(None, (s.strip() for s in spec.split(","))):
    match = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", item)
    if not match or match[1] not in MESH_AXES or match[1] in seen:
      raise ValueError(
          f"--mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
          f"{MESH_AXES}, each at most once, e.g. 'data=2,fsdp=4'.")
    seen.add(match[1])
    sizes[match[1]] = int(match[2])
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f"--mesh {spec!r}: sizes must be positive (one may be -1).")
  known = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"--mesh {spec!r}: {num_devices} devices are not a "
                       f"multiple of {known}.")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f"--mesh {spec!r} has {math.prod(sizes.values())} devices but JAX "
        f"sees {num_devices}; make the sizes multiply to {num_devices} (or use "
        "-1 for one axis), or pass --simulate-devices on a CPU host.")
  return sizes


def make_mesh(spec: str, devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all, all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       devices=devices, axis_types=(auto,) * len(MESH_AXES))


# ------------------------------------------------------------------ model


def _fsdp(init: Any, spec: tuple[Any, ...]) -> Any:
  """An initializer whose variable is split over ``fsdp`` as ``spec`` says."""
  return nnx.with_partitioning(init, spec)


def _dense(din: int, dout: int, rngs: nnx.Rngs, *, bias: bool = True
           ) -> nnx.Linear:
  # FSDP shards each kernel's input dimension and each bias over 'fsdp'.
  return nnx.Linear(
      din, dout, use_bias=bias, rngs=rngs,
      kernel_init=_fsdp(nnx.initializers.lecun_normal(), ("fsdp", None)),
      bias_init=_fsdp(nnx.initializers.zeros_init(), ("fsdp",)))


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      dim, rngs=rngs,
      scale_init=_fsdp(nnx.initializers.ones_init(), ("fsdp",)),
      bias_init=_fsdp(nnx.initializers.zeros_init(), ("fsdp",)))


class Block(nnx.Module):
  """Pre-norm causal self-attention and MLP, each with a residual."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = _layer_norm(dim, rngs)
    # No bias on q, k, v: the key bias's gradient is exactly zero in exact
    # arithmetic (softmax ignores a per-row constant), so any optimizer that
    # normalises its gradient (Adam, Madam) would only amplify round-off.
    self.qkv = _dense(dim, 3 * dim, rngs, bias=False)
    self.out = _dense(dim, dim, rngs)
    self.norm2 = _layer_norm(dim, rngs)
    self.up = _dense(dim, 4 * dim, rngs)
    self.down = _dense(4 * dim, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in (q, k, v))
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(attended.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  """Causal character Transformer: tokens (B, T) -> logits (B, T, VOCAB)."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    embed_init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(VOCAB, config.dim, rngs=rngs,
                           embedding_init=_fsdp(embed_init, ("fsdp", None)))
    self.position = nnx.Param(_fsdp(embed_init, (None, "fsdp"))(
        rngs.params(), (config.context, config.dim)))
    self.blocks = nnx.List([Block(config.dim, config.heads, rngs)
                            for _ in range(config.layers)])
    self.norm = _layer_norm(config.dim, rngs)
    self.head = _dense(config.dim, VOCAB, rngs, bias=False)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def check_config(config: Config, mesh: jax.sharding.Mesh) -> None:
  """Raises ``ValueError`` if the fsdp axis cannot split the model evenly.

  ``fsdp`` splits every tensor along a dimension of size ``dim``,
  ``4 * dim`` or ``VOCAB``; attention splits ``dim`` into ``heads``.
  """
  fsdp = mesh.shape["fsdp"]
  if config.dim % config.heads:
    raise ValueError(f"--dim {config.dim} is not a multiple of --heads "
                     f"{config.heads}.")
  if config.dim % fsdp or VOCAB % fsdp:
    raise ValueError(
        f"--dim {config.dim} and the vocabulary size {VOCAB} must be multiples "
        f"of the fsdp mesh size {fsdp}, which splits every parameter tensor "
        "along one of them.")


# ------------------------------------------------------------------- data


def corpus() -> np.ndarray:
  """ASCII codes of the standard library docstrings in ``CORPUS_MODULES``."""
  text = "\n\n".join(importlib.import_module(m).__doc__ or ""
                     for m in CORPUS_MODULES)
  codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
  return codes.astype(np.int32) % VOCAB


def split_corpus(tokens: np.ndarray, valid_fraction: float = 0.1
                 ) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(tokens) * (1 - valid_fraction))
  return tokens[:cut], tokens[cut:]


def global_batch_rows(tokens: np.ndarray, step: int, batch_size: int,
                      context: int, seed: int) -> np.ndarray:
  """The ``step``-th global batch of windows (``context + 1`` tokens each);
  the same on every process."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - context - 1, batch_size)
  return np.stack([tokens[s:s + context + 1] for s in starts])


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]
               ) -> slice:
  """The rows of a global batch that this process's devices hold."""
  spans = [idx[0] for idx in
           sharding.addressable_devices_indices_map(global_shape).values()]
  rows = {(s.start or 0, global_shape[0] if s.stop is None else s.stop)
          for s in spans}
  lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(
        f"this process's devices hold rows {sorted(rows)} of the batch, which "
        "are not contiguous; build the mesh with jax.make_mesh (it keeps each "
        "host's devices together).")
  return slice(lo, hi)


def device_batch(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global ``jax.Array`` of the batch from this process's rows only."""
  local = rows[local_rows(sharding, rows.shape)]
  return jax.make_array_from_process_local_data(sharding, local, rows.shape)


# -------------------------------------------------------------- training


def loss_fn(model: Transformer, batch: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats per character)."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


def make_optimizer(params: Any, config: Config
                   ) -> optax.GradientTransformation:
  """Madam for every tensor it can move; Adam for the zero-initialised ones
  (biases, LayerNorm offsets), which a multiplicative update never moves."""
  madam = madam_optax.madam(learning_rate=config.learning_rate,
                            p_scale=config.p_scale)
  return madam_optax.with_additive_fallback(
      params, madam, optax.adam(config.additive_learning_rate))


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built on a mesh."""
  mesh: jax.sharding.Mesh
  graphdef: Any
  state: Any                 # (model, optimizer) state, sharded
  state_sharding: Any
  params_sharding: Any
  batch_sharding: NamedSharding
  train_step: Any            # jitted (state, batch) -> (state, loss)
  eval_loss: Any             # jitted (state, batch) -> loss


def setup(config: Config, devices: Sequence[Any] | None = None) -> Setup:
  """Builds the sharded model, optimizer and jitted steps on a mesh.

  Parameters are created under ``jax.set_mesh`` with their
  ``nnx.with_partitioning`` annotations and are sharded as they are created
  (eagerly here: each tensor is drawn whole, then split; a model too large
  for one device is created inside a jitted function instead, as in Flax's
  sharding guide). ``nnx.Optimizer`` then creates Madam's second moment (and
  Adam's moments for the additive leaves) with the same shardings, and the
  per-tensor bounds as replicated scalars.
  """
  mesh = make_mesh(config.mesh, devices)
  with jax.set_mesh(mesh):
    check_config(config, mesh)
    model = Transformer(config, nnx.Rngs(config.seed))
    params = nnx.state(model, nnx.Param)
    optimizer = nnx.Optimizer(model, make_optimizer(params, config),
                              wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  params_sharding = jax.tree.map(lambda x: x.sharding,
                                 nnx.state(model, nnx.Param))
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def eval_loss(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return loss_fn(model, batch)

  # Shardings pinned in and out: the state keeps its layout step after step.
  train_step = jax.jit(train_step,
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)
  eval_loss = jax.jit(eval_loss, in_shardings=(state_sharding, batch_sharding))
  return Setup(mesh, graphdef, state, state_sharding, params_sharding,
               batch_sharding, train_step, eval_loss)


def optimizer_update(run: Setup):
  """The optimizer update alone, ``(state, grads) -> state``, jitted with the
  run's shardings (``optimizer.update`` as in the train step, without the
  forward and backward passes): for inspecting what it compiles to."""
  def update(state, grads):
    model, optimizer = nnx.merge(run.graphdef, state)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  return jax.jit(update, in_shardings=(run.state_sharding, run.params_sharding),
                 out_shardings=run.state_sharding)


def params_of(run: Setup, state: Any) -> Any:
  """The parameters (an ``nnx.State`` of ``nnx.Param``) in a run's state."""
  return nnx.state(nnx.merge(run.graphdef, state)[0], nnx.Param)


def collectives_in_hlo(hlo_text: str) -> list[str]:
  """Cross-device collectives named in compiled HLO text (sorted)."""
  return sorted({op for op in COLLECTIVES
                 if re.search(rf"\b{op}(-start)?\(", hlo_text)})


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """Bytes of ``tree``'s arrays held by each addressable device."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def train(config: Config, devices: Sequence[Any] | None = None, *,
          log: Any = None) -> dict[str, Any]:
  """Trains for ``config.steps`` steps; returns the losses and the final
  (sharded) state."""
  run = setup(config, devices)
  train_tokens, valid_tokens = split_corpus(corpus())
  valid = device_batch(
      global_batch_rows(valid_tokens, 0, config.batch_size, config.context,
                        config.seed + 1), run.batch_sharding)
  state, losses, valid_losses = run.state, [], []
  start = time.perf_counter()
  for step in range(config.steps):
    batch = device_batch(global_batch_rows(train_tokens, step,
                                           config.batch_size, config.context,
                                           config.seed), run.batch_sharding)
    state, loss = run.train_step(state, batch)
    losses.append(loss)
    if log and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
      valid_losses.append((step + 1, float(run.eval_loss(state, valid))))
      log(f"step {step + 1:5d}  train loss {float(loss):.3f}  "
          f"valid loss {valid_losses[-1][1]:.3f} nats/char  "
          f"({time.perf_counter() - start:.1f} s)")
  losses = [float(x) for x in losses]
  return {"losses": losses, "valid_losses": valid_losses, "run": run,
          "state": state, "final_valid_loss": float(run.eval_loss(state, valid))}


# -------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Multi-host: see the module docstring "
             "(python -m pydoc madam_examples.sharded_train).")
  helps = {
      "mesh": "AXIS=SIZE,... over the axes data and fsdp; one size may be -1 "
              "(the rest); they multiply to the number of devices",
      "batch_size": "global batch, over all devices and hosts",
      "learning_rate": "Madam's learning rate",
      "p_scale": "Madam's magnitude bound, in initial RMS of each tensor",
      "additive_learning_rate": "Adam's, for the zero-initialised leaves",
  }
  for field in dataclasses.fields(Config):
    parser.add_argument("--" + field.name.replace("_", "-"),
                        type=type(field.default), default=field.default,
                        help=f"{helps.get(field.name, '')} "
                             f"(default {field.default})".strip())
  parser.add_argument("--simulate-devices", type=int, default=None,
                      help="split the host CPU into this many JAX devices "
                           "(testing a mesh without accelerators)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (auto-detects "
                           "Cloud TPU, SLURM, Open MPI)")
  parser.add_argument("--coordinator-address", default=None,
                      help="host:port of process 0 (multi-host)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--check-collectives", action="store_true",
                      help="print the collectives XLA compiled into the "
                           "train step and into the optimizer update alone")
  return parser.parse_args(argv)


def initialise_runtime(args: argparse.Namespace) -> None:
  """Simulated CPU devices or the multi-host runtime: before any JAX use."""
  if args.simulate_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.simulate_devices)
  if args.distributed or args.coordinator_address:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  initialise_runtime(args)
  config = Config(**{f.name: getattr(args, f.name)
                     for f in dataclasses.fields(Config)})
  leader = jax.process_index() == 0

  def log(message: str) -> None:
    if leader:
      print(message, flush=True)

  log(f"{jax.process_count()} process(es), {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s); mesh {config.mesh}")
  result = train(config, log=log)
  run, state = result["run"], result["state"]
  log(f"mesh {dict(run.mesh.shape)}; parameters "
      f"{sum(x.size for x in jax.tree.leaves(nnx.state(state[0], nnx.Param)))}")
  model_bytes = bytes_per_device(nnx.state(state[0], nnx.Param))
  opt_bytes = bytes_per_device(state[1])
  for device in sorted(model_bytes, key=lambda d: d.id)[:4]:
    log(f"  {device}: params {model_bytes[device] / 1024:.1f} KiB, optimizer "
        f"state {opt_bytes.get(device, 0) / 1024:.1f} KiB")
  if args.check_collectives:
    batch = device_batch(np.zeros((config.batch_size, config.context + 1),
                                  np.int32), run.batch_sharding)
    step_hlo = run.train_step.lower(state, batch).compile().as_text()
    update_hlo = optimizer_update(run).lower(
        state, params_of(run, state)).compile().as_text()
    log(f"collectives in the train step: {collectives_in_hlo(step_hlo)}")
    log("collectives in the optimizer update: "
        f"{collectives_in_hlo(update_hlo) or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
