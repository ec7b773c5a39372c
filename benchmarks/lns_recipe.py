"""int8 LNS training of the Transformer by the recipe: perplexity and bytes.

The recipe (``madam_optax.madam_labels``) trains the hidden weight matrices
multiplicatively and gives the token and position embeddings, the output
head, norms and biases to an additive optimizer. With LNS weights the hidden
matrices are int8 codes (``lns_madam(int8, factored=True)``) while the
additive leaves stay float32 and carry the additive optimizer's state, which
costs bytes where the embeddings are large. This script measures both sides:

* **perplexity** of the examples' character Transformer after ``--steps``
  steps (cosine decay to 0, 3 seeds in one ``vmap``) for the int8 recipe with
  three additive optimizers (``madam_examples.lns_transformer.ADDITIVE``:
  Adam; Adam with a bfloat16 first moment; Adafactor's factored second
  moment without a first moment), against float Madam by the same recipe and
  float Adam;
* **bytes per parameter** of the stored weights (codes, their float32
  scales, the float leaves) plus the optimizer state, from the arrays'
  ``.nbytes``, on the GPT-2-small-shaped tree of
  ``benchmarks/lns_memory.py`` (embeddings included), for the same three
  additive optimizers.

  nice python benchmarks/lns_recipe.py        # writes results/lns_recipe.{md,json}
  python benchmarks/lns_recipe.py --quick     # a few steps, the small tree
  python benchmarks/lns_recipe.py --replot

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560; Shazeer and
Stern, "Adafactor", arXiv:1804.04235.
"""

from __future__ import annotations

import time
from typing import Any

import _harness as harness
import jax
import jax.numpy as jnp
import lns_memory
import numpy as np

from madam_examples import lns_transformer
from madam_examples import loop
from madam_examples import tasks as tasks_lib
import madam_optax

SEEDS = 3
STEPS = 300  # the learning-rate study's Transformer at x1
QUICK_STEPS = 10
# Float Adam's best rate on this Transformer in the learning-rate study, and
# Madam's best rate under the recipe there.
ADAM_LR = 1e-2
MADAM_LR = 0.1
# name -> (kind, Madam's rate, additive optimizer).
TRAINING = {
  "adam fp32": ("adam", ADAM_LR, None),
  "madam fp32, recipe (Adam)": ("madam", MADAM_LR, None),
  "lns int8, recipe (Adam)": ("lns", MADAM_LR, "adam"),
  "lns int8, recipe (factored v)": ("lns", MADAM_LR, "factored"),
}


def train(task, kind: str, lr: float, additive: str | None, steps: int):
  """Final validation perplexity of each seed (one jitted ``vmap``)."""
  keys = jnp.stack(
    [jax.random.key_data(jax.random.key(s)) for s in range(SEEDS)]
  )
  if kind == "lns":
    run = lns_transformer.make_run_fn(task, steps, additive=additive)

    def final(key, data):
      return run(jax.random.wrap_key_data(key), lr, data)[1]["after"][
        task.metric
      ]
  else:
    run = loop.make_run_fn(task, kind, steps, steps, schedule="cosine")

    def final(key, data):
      return run(jax.random.wrap_key_data(key), lr, data)[task.metric][-1]

  values = jax.jit(jax.vmap(final, in_axes=(0, None)))(keys, task.data)
  return np.asarray(jax.device_get(values), np.float64).tolist()


def stored_recipe(params: Any, additive: str) -> dict[str, Any]:
  """Bytes of the int8 recipe's weights and optimizer state on ``params``."""
  codes, scales = lns_transformer.encode_recipe(
    params, params, lns_transformer.INT8, p_scale=2.0
  )
  tx = lns_transformer.recipe_optimizer(
    codes, 0.01, additive=additive, min_dim_size_to_factor=128
  )
  state = tx.init(codes)
  weights = harness.tree_bytes((codes, scales))
  held = harness.tree_bytes(state)
  n = harness.param_count(params)
  floats = sum(x.size for x in jax.tree.leaves(codes) if x.dtype == jnp.float32)
  return {
    "additive": additive,
    "weights": weights,
    "state": held,
    "bytes_per_param": (weights + held) / n,
    "float_share": floats / n,
  }


def markdown_body(results: dict) -> str:
  lines = [
    f"Perplexity: the examples' character Transformer, "
    f"{results['steps']} steps, cosine decay to 0 for every rate, mean ± "
    f"std over {SEEDS} seeds. The recipe's additive leaves (embeddings, "
    "head, norms, biases) at "
    f"{madam_optax.ADDITIVE_LEARNING_RATE:g} under the same cosine; "
    "int8 codes (127 levels) for the hidden matrices with "
    "`lns_madam(int8, factored=True)` (statistics factored from dimension 8 "
    "in this small model).",
    "",
    "| configuration | perplexity | seconds |",
    "|---|---|---|",
  ]
  for name, r in results["training"].items():
    v = np.asarray(r["values"])
    lines.append(
      f"| {name} | {v.mean():.3f} ± {v.std():.3f} | {r['seconds']:.0f} |"
    )
  lines += [""]
  memory = results.get("memory")
  if memory:
    lines += [
      f"Bytes per parameter on {memory['model']} ({memory['parameters']:,} "
      "parameters; token embedding tied with the output layer, as in GPT-2): "
      "stored weights (int8 codes of the hidden matrices with their float32 "
      "scales; the embeddings, norms and biases float32) plus the optimizer "
      "state, from the arrays' `.nbytes`; factored statistics from dimension "
      "128 (Adafactor's rule).",
      "",
      "| additive optimizer | weights B | state B | bytes/param | float32 "
      "share of parameters |",
      "|---|---|---|---|---|",
    ]
    for r in memory["rows"]:
      lines.append(
        f"| {r['additive']} | {r['weights']} | {r['state']} | "
        f"{r['bytes_per_param']:.3f} | {r['float_share']:.3f} |"
      )
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
  "int8 LNS training of the Transformer by the recipe", markdown_body
)


def parse_args(argv=None):
  return harness.parse_args(
    harness.argument_parser(__doc__, "lns_recipe"), argv, __file__
  )


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  steps = QUICK_STEPS if args.quick else STEPS
  task = tasks_lib.build_task("transformer", quick=args.quick)
  results: dict[str, Any] = {
    "machine": harness.machine_record(args.command),
    "steps": steps,
    "training": {},
  }
  if args.quick:
    params, model = harness.mlp_params((64, 128, 10)), "digits MLP 64-128-10"
  else:
    params, model = lns_memory.gpt2_small_params(), lns_memory.GPT2
  results["memory"] = {
    "model": model,
    "parameters": harness.param_count(params),
    "rows": [stored_recipe(params, a) for a in lns_transformer.ADDITIVE],
  }
  del params
  for row in results["memory"]["rows"]:
    log(f"{row['additive']}: {row['bytes_per_param']:.3f} bytes/param")
  for name, (kind, lr, additive) in TRAINING.items():
    t0 = time.perf_counter()
    values = train(task, kind, lr, additive, steps)
    results["training"][name] = {
      "kind": kind,
      "learning_rate": lr,
      "additive": additive,
      "values": values,
      "seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"{name}: perplexity {np.mean(values):.3f} ({values})")
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
