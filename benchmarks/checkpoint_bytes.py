"""Bytes on disk per parameter of Orbax checkpoints: Madam, LNS-Madam, Adam.

Each optimizer trains the same MLP (LeCun-normal kernels, zero biases, sent
to Adam by ``madam_optax.with_additive_fallback`` as the recipe says) for a
few steps on random-normal gradients, so that its state is dense and not the
zeros of ``init``; then the full training state (parameters, optimizer state,
LNS scales) is saved with ``madam_examples.checkpointing.save``, and so are
the parameters alone (what inference needs). The figures are the sizes of
all files in the step folder (arrays, Orbax metadata and commit markers)
divided by the number of parameters; the in-memory bytes of the same arrays
are given alongside. Orbax compresses arrays (zarr with zstd), so the disk
figures depend on the values: random-looking float32 mantissas barely
compress, low-entropy integer codes do.

The dtype each parameter kernel has *on disk* is read from the stored zarr
metadata with TensorStore (not through Orbax): LNS codes stay ``int8``.

Usage::

  python benchmarks/checkpoint_bytes.py            # writes results/
  python benchmarks/checkpoint_bytes.py --quick    # tiny smoke run, prints
  python benchmarks/checkpoint_bytes.py --dims 784,256,10 --out -
  python benchmarks/checkpoint_bytes.py --replot   # the table from the JSON

Reference for Madam: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Callable

import _harness as harness
import jax
import jax.numpy as jnp
import optax

from madam_examples import checkpointing
import madam_optax

FMT = madam_optax.LNSFormat.spanning(127)  # 8-bit codes (int8)

# --------------------------------------------------------------------------
# Model and training: the shared MLP tree, a few steps on random gradients.


def configs() -> dict[str, dict[str, Any]]:
  """name -> optimizer factory, stored LNS format, Adam for zero leaves, and
  a description."""
  return {
    "madam": dict(
      tx=lambda: madam_optax.madam(0.01),
      fmt=None,
      additive=True,
      what="madam, float32 weights and second moment",
    ),
    "madam_bf16": dict(
      tx=lambda: madam_optax.madam(0.01, state_dtype=jnp.bfloat16),
      fmt=None,
      additive=True,
      what="madam, float32 weights, bfloat16 second moment",
    ),
    "lns_madam_int8": dict(
      tx=lambda: madam_optax.lns_madam(FMT, 0.01),
      fmt=FMT,
      additive=True,
      what="lns_madam, int8 codes, float32 second moment",
    ),
    "lns_madam_int8_bf16": dict(
      tx=lambda: madam_optax.lns_madam(FMT, 0.01, state_dtype=jnp.bfloat16),
      fmt=FMT,
      additive=True,
      what="lns_madam, int8 codes, bfloat16 second moment",
    ),
    "adam": dict(
      tx=lambda: optax.adam(1e-3),
      fmt=None,
      additive=False,
      what="optax.adam, float32 weights, mu and nu",
    ),
  }


def train_state(name: str, params: dict, steps: int, seed: int = 1) -> dict:
  """The state after ``steps`` updates on random-normal gradients.

  Returns ``{"params", "opt_state"}`` and, for LNS-Madam, ``"scales"``.
  """
  cfg = configs()[name]
  state, tx = harness.stored_for_training(
    params, cfg["tx"](), cfg["fmt"], additive=cfg["additive"]
  )
  weights = state["params"]
  opt_state = tx.init(weights)

  @jax.jit
  def step(weights, opt_state, key):
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, len(leaves))
    grads = treedef.unflatten(
      [jax.random.normal(k, jnp.shape(w)) for k, w in zip(keys, leaves)]
    )
    return harness.update_and_apply(tx, grads, opt_state, weights)

  key = jax.random.key(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    weights, opt_state = step(weights, opt_state, sub)
  state["params"] = weights
  state["opt_state"] = opt_state
  return state


# --------------------------------------------------------------------------
# The measurement: bytes on disk.


def folder_bytes(folder: pathlib.Path) -> tuple[int, int, int]:
  """(sum of file sizes, allocated bytes, number of files) under ``folder``."""
  size = blocks = files = 0
  for root, _, names in os.walk(folder):
    for n in names:
      st = os.stat(os.path.join(root, n))
      size += st.st_size
      blocks += st.st_blocks * 512
      files += 1
  return size, blocks, files


def stored_dtype(step_folder: pathlib.Path, leaf: str) -> str:
  """The dtype of ``leaf`` in the stored zarr metadata, read with TensorStore."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  spec = {
    "driver": "zarr",
    "kvstore": {
      "driver": "ocdbt",
      "base": "file://" + str(step_folder / "default"),
      "path": leaf,
    },
  }
  return str(ts.open(spec).result().dtype.numpy_dtype)


def measure(
  name: str,
  params: dict,
  steps: int,
  workdir: pathlib.Path,
  log: Callable = harness.progress,
) -> dict:
  """Saves ``name``'s state after ``steps`` steps (all, and the params alone).

  Returns the row: bytes on disk and in memory, in all and per parameter,
  and the dtype of the first kernel on disk.
  """
  state = train_state(name, params, steps)
  n = harness.param_count(params)
  row = dict(optimizer=name, what=configs()[name]["what"], n_params=n)
  for part, tree in (
    ("full", state),
    ("params", {k: v for k, v in state.items() if k in ("params", "scales")}),
  ):
    folder = workdir / name / part
    step_folder = pathlib.Path(checkpointing.save(folder, steps, tree))
    size, alloc, files = folder_bytes(step_folder)
    memory = harness.tree_bytes(tree)
    row[part] = dict(
      memory_bytes=memory,
      disk_bytes=size,
      allocated_bytes=alloc,
      files=files,
      memory_bytes_per_param=memory / n,
      disk_bytes_per_param=size / n,
      allocated_bytes_per_param=alloc / n,
    )
  row["kernel_dtype_on_disk"] = stored_dtype(
    workdir / name / "full" / str(steps), "params.dense0.kernel"
  )
  log(
    f"{name:22s} full {row['full']['disk_bytes_per_param']:.3f} B/param "
    f"on disk ({row['full']['memory_bytes_per_param']:.3f} in memory), "
    f"params only {row['params']['disk_bytes_per_param']:.3f}, kernel "
    f"stored as {row['kernel_dtype_on_disk']}"
  )
  return row


# --------------------------------------------------------------------------
# Report and command line.


def markdown_body(results: dict) -> str:
  """The table below the machine record (from the JSON's contents)."""
  lines = [
    f"MLP {results['dims']} ({results['n_params']:,} parameters), state "
    f"after {results['steps']} steps on random-normal gradients (biases: "
    "Adam, by `with_additive_fallback`). Bytes per parameter: all files of "
    "the checkpoint's step folder (arrays compressed by Orbax, metadata, "
    "commit markers) / number of parameters; in memory: the arrays' bytes. "
    "Kernel on disk: dtype in the stored zarr metadata.",
    "",
    "| optimizer | what is stored | full state: disk | full state: memory "
    "| params only: disk | params only: memory | kernel on disk |",
    "|---|---|---:|---:|---:|---:|---|",
  ]
  for r in results["rows"]:
    lines.append(
      f"| {r['optimizer']} | {r['what']} | "
      f"{r['full']['disk_bytes_per_param']:.3f} | "
      f"{r['full']['memory_bytes_per_param']:.3f} | "
      f"{r['params']['disk_bytes_per_param']:.3f} | "
      f"{r['params']['memory_bytes_per_param']:.3f} | "
      f"{r['kernel_dtype_on_disk']} |"
    )
  return "\n".join(lines)


REPORT = harness.Report("Checkpoint bytes on disk per parameter", markdown_body)


def parse_args(argv=None):
  ap = harness.argument_parser(__doc__, "checkpoint_bytes")
  ap.add_argument(
    "--dims",
    default="784,1024,1024,10",
    help="MLP layer widths, comma-separated (quick: 32,64,10)",
  )
  ap.add_argument(
    "--steps", type=int, default=10, help="training steps before saving"
  )
  ap.add_argument(
    "--optimizers",
    default=",".join(configs()),
    help="subset of the optimizers, comma-separated",
  )
  args = harness.parse_args(ap, argv, __file__)
  unknown = set(args.optimizers.split(",")) - set(configs())
  if unknown:
    ap.error(
      f"unknown optimizers {sorted(unknown)}; choose from {list(configs())}"
    )
  return args


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  dims = (
    (32, 64, 10) if args.quick else tuple(int(d) for d in args.dims.split(","))
  )
  params = harness.mlp_params(dims)
  results = dict(
    machine=harness.machine_record(args.command, packages=["orbax.checkpoint"]),
    dims=list(dims),
    steps=args.steps,
    n_params=harness.param_count(params),
    rows=[],
  )
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.optimizers.split(","):
      results["rows"].append(
        measure(name, params, args.steps, pathlib.Path(tmp), log)
      )
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
