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
  python benchmarks/lns_memory.py --quick    # the small model, prints only
  python benchmarks/lns_memory.py --replot   # the table from the JSON

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _harness as harness
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
INT16 = madam_optax.LNSFormat.spanning(4096)


# name -> (optimizer factory, LNS format of the stored weights or None,
# zero-initialised leaves to Adam).
CONFIGS = {
    "lns_madam int8 + bf16 v": (
        lambda: madam_optax.lns_madam(INT8, state_dtype=jnp.bfloat16), INT8,
        True),
    "lns_madam int8 + fp32 v": (lambda: madam_optax.lns_madam(INT8), INT8,
                                True),
    "lns_madam int16 + fp32 v": (lambda: madam_optax.lns_madam(INT16), INT16,
                                 True),
    "madam fp32": (madam_optax.madam, None, True),
    "adam fp32": (lambda: optax.adam(1e-3), None, False),
}


def measure(params) -> list[dict]:
  """Bytes per parameter of each configuration on float32 ``params``.

  Returns one row per configuration: total bytes of weights (``weights``)
  and optimizer state (``state``), bytes per parameter over the whole model
  (``bytes_per_param``), and over the weight matrices alone
  (``bytes_per_weight``: stored weight plus its state entries, biases and
  per-tensor scalars excluded), and the dtypes found.
  """
  n = harness.param_count(params)
  matrices = [x for x in jax.tree.leaves(params) if np.ndim(x) >= 2]
  n_w = harness.param_count(matrices)
  shapes = {tuple(np.shape(x)) for x in matrices}

  def weight_sized(x):
    return tuple(np.shape(x)) in shapes

  rows = []
  for name, (make_tx, fmt, additive) in CONFIGS.items():
    weights, tx = harness.stored_for_training(params, make_tx(), fmt,
                                              additive=additive)
    state = tx.init(weights["params"])
    both = (weights, state)
    rows.append(dict(
        config=name,
        weights=harness.tree_bytes(weights), state=harness.tree_bytes(state),
        bytes_per_param=harness.tree_bytes(both) / n,
        bytes_per_weight=harness.tree_bytes(both, where=weight_sized) / n_w,
        weight_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(both)
                              if weight_sized(x)})))
  return rows


MODELS = {
    "digits MLP 64-128-10": (64, 128, 10),
    "MLP 784-1024-1024-1024-10": (784, 1024, 1024, 1024, 10),
}


def markdown_body(results: dict) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  lines = [
      "Bytes of the stored weights (LNS codes and their float32 per-tensor "
      "scales, or float32 weights) plus the optimizer state, summed from the "
      "arrays' `.nbytes`, divided by the number of parameters. `per weight` "
      "counts only the weight-matrix elements and their state entries (no "
      "biases, no per-tensor scalars). Biases are float32 and trained by "
      "`optax.adam` in every Madam variant (`with_additive_fallback`).",
      ""]
  for model, res in results["results"].items():
    lines += [f"## {model} ({res['parameters']} parameters)", "",
              "| configuration | weights B | state B | bytes/param | "
              "bytes/weight | weight-sized dtypes |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
      lines.append(f"| {r['config']} | {r['weights']} | {r['state']} | "
                   f"{r['bytes_per_param']:.3f} | {r['bytes_per_weight']:.2f} "
                   f"| {', '.join(r['weight_dtypes'])} |")
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report("LNS-Madam: training memory per parameter",
                        markdown_body)


def parse_args(argv=None):
  return harness.parse_args(harness.argument_parser(__doc__, "lns_memory"),
                            argv, __file__)


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
  results = {"machine": harness.machine_record(args.command), "results": {}}
  for model, sizes in models.items():
    params = harness.mlp_params(sizes)
    results["results"][model] = dict(parameters=harness.param_count(params),
                                     rows=measure(params))
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
