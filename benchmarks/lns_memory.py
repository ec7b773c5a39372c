"""Training memory per parameter: LNS-Madam's integer codes against float optimizers.

Bytes of everything a training step keeps between steps, measured from the
actual arrays (``.nbytes`` of every leaf): the stored weights (LNS codes plus
their per-tensor float32 scales, or float32 weights) and the optimizer state.
Configurations:

* ``lns_madam int8 + bf16 v``: 127-level codes (``int8``), second moment in
  ``bfloat16`` (``state_dtype=jnp.bfloat16``);
* ``lns_madam int8 + fp32 v``: the same with a float32 second moment;
* ``lns_madam int16 + fp32 v``: 4096-level codes (``int16``);
* ``madam fp32``: ``madam_optax.madam()`` on float32 weights;
* ``adam fp32``: ``optax.adam`` on float32 weights (weights, mu, nu).

Zero-initialised biases follow the library's recipe in every Madam variant
(kept float32, trained additively by ``optax.adam`` through
``madam_optax.with_additive_fallback``), so they cost Adam's 12 bytes each;
the table also gives bytes per weight-matrix element alone.

Usage::

  python benchmarks/lns_memory.py            # writes benchmarks/results/lns_memory.{md,json}
  python benchmarks/lns_memory.py --quick    # small models, prints only

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax
from madam_examples import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
INT8 = madam_optax.LNSFormat.spanning(127)
INT16 = madam_optax.LNSFormat.spanning(4096)


def mlp_params(sizes, seed=0):
  """Glorot-normal weight matrices and zero biases for an MLP ``sizes``."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  params = {}
  for i, (key, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "kernel": jax.random.normal(key, (m, n)) * np.sqrt(2.0 / (m + n)),
        "bias": jnp.zeros((n,)),
    }
  return params


def _lns(fmt, state_dtype=None):
  def build(params):
    codes, scales = madam_optax.lns_encode_tree(params, fmt)
    tx = madam_optax.with_additive_fallback(
        codes, madam_optax.lns_madam(fmt, state_dtype=state_dtype),
        optax.adam(1e-3))
    return (codes, scales), tx.init(codes)
  return build


def _madam(params):
  tx = madam_optax.with_additive_fallback(params, madam_optax.madam(),
                                          optax.adam(1e-3))
  return params, tx.init(params)


def _adam(params):
  return params, optax.adam(1e-3).init(params)


CONFIGS = {
    "lns_madam int8 + bf16 v": _lns(INT8, jnp.bfloat16),
    "lns_madam int8 + fp32 v": _lns(INT8),
    "lns_madam int16 + fp32 v": _lns(INT16),
    "madam fp32": _madam,
    "adam fp32": _adam,
}


def tree_bytes(tree) -> int:
  """Sum of ``.nbytes`` over the array leaves of ``tree``."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def measure(params) -> list[dict]:
  """Bytes per parameter of each configuration on float32 ``params``.

  Returns one row per configuration: total bytes of weights (``weights``)
  and optimizer state (``state``), bytes per parameter over the whole model
  (``bytes_per_param``), and over the weight matrices alone
  (``bytes_per_weight``: stored weight plus its state entries, biases and
  per-tensor scalars excluded), and the dtypes found.
  """
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  matrices = [x for x in jax.tree.leaves(params) if np.ndim(x) >= 2]
  n_w = sum(int(np.size(x)) for x in matrices)
  shapes = {tuple(np.shape(x)) for x in matrices}
  rows = []
  for name, build in CONFIGS.items():
    weights, state = build(params)
    leaves = jax.tree.leaves(weights) + jax.tree.leaves(state)
    per_weight = sum(np.asarray(x).nbytes for x in leaves
                     if tuple(np.shape(x)) in shapes)
    rows.append(dict(
        config=name,
        weights=tree_bytes(weights), state=tree_bytes(state),
        bytes_per_param=(tree_bytes(weights) + tree_bytes(state)) / n,
        bytes_per_weight=per_weight / n_w,
        weight_dtypes=sorted({str(np.asarray(x).dtype) for x in leaves
                              if tuple(np.shape(x)) in shapes})))
  return rows


MODELS = {
    "digits MLP 64-128-10": (64, 128, 10),
    "MLP 784-1024-1024-1024-10": (784, 1024, 1024, 1024, 10),
}


def report(results, info, command) -> str:
  lines = [
      "# LNS-Madam: training memory per parameter",
      "",
      f"Command: `{command}`. Bytes of the stored weights (LNS codes and "
      "their float32 per-tensor scales, or float32 weights) plus the optimizer "
      "state, summed from the arrays' `.nbytes`, divided by the number of "
      "parameters. `per weight` counts only the weight-matrix elements and "
      "their state entries (no biases, no per-tensor scalars). Biases are "
      "float32 and trained by `optax.adam` in every Madam variant "
      "(`with_additive_fallback`).",
      "",
      f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}, "
      f"optax {info['optax']}, flax {info['flax']}; {info['date']}.",
      ""]
  for model, (n, rows) in results.items():
    lines += [f"## {model} ({n} parameters)", "",
              "| configuration | weights B | state B | bytes/param | "
              "bytes/weight | weight-sized dtypes |",
              "|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['config']} | {r['weights']} | {r['state']} | "
                   f"{r['bytes_per_param']:.3f} | {r['bytes_per_weight']:.2f} "
                   f"| {', '.join(r['weight_dtypes'])} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="the small model only; prints, writes only with --out")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  command = " ".join(["python benchmarks/lns_memory.py"] + list(
      argv if argv is not None else sys.argv[1:]))
  quick = args.quick or os.environ.get("MADAM_QUICK") == "1"
  models = dict(list(MODELS.items())[:1]) if quick else MODELS
  if args.out is None and not quick:
    args.out = RESULTS
  info = machine.machine_info()
  results = {}
  for model, sizes in models.items():
    params = mlp_params(sizes)
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    results[model] = (n, measure(params))
  text = report(results, info, command)
  print(text)
  if args.out is not None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lns_memory.md"), "w",
              encoding="utf-8") as f:
      f.write(text)
    with open(os.path.join(args.out, "lns_memory.json"), "w",
              encoding="utf-8") as f:
      json.dump(dict(machine=info, command=command, results={
          m: dict(parameters=n, rows=rows) for m, (n, rows) in results.items()}),
                f, indent=1)
  return results


if __name__ == "__main__":
  main()
