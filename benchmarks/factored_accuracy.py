"""What the factored second moment costs in accuracy: Madam, Madam factored, int8.

Three configurations at the same learning rate, steps, batches and initial
weights, on the examples' models and training code:

* ``madam``: ``madam_optax.madam()`` (full second moment, float32 weights);
* ``madam factored``: ``madam(factored=True)``;
* ``lns int8 factored``: ``lns_madam(fmt, factored=True)`` on 127-level
  ``int8`` codes (stochastic rounding).

Models: the LNS digits MLP and CNN of ``madam_examples.lns_digits`` (test
accuracy, constant learning rate, as that example trains them) and the
character Transformer of ``madam_examples.tasks`` (validation perplexity,
cosine decay, as ``madam_examples.lns_transformer`` trains it). Every run is
the examples' ``loop.train``: the float configurations with optimizer
``"madam"``, the int8 one with ``"lns_madam"`` and ``lns_format``, the
factored ones with ``optimizer_options={"factored": True, ...}``.
Zero-initialised leaves are trained by Adam in every configuration
(``with_additive_fallback``); the second-moment statistics are float32. The
models are small, so matrices are factored from ``MIN_DIM_SIZE_TO_FACTOR`` =
8 (Adafactor's 128 would factor none of them); the report gives the share of
weights whose second moment is factored.

Usage::

  python benchmarks/factored_accuracy.py            # writes benchmarks/results/factored_accuracy.{md,json}
  python benchmarks/factored_accuracy.py --quick    # a smoke run, prints only
  python benchmarks/factored_accuracy.py --replot   # the tables from the JSON

References: Bernstein et al., arXiv:2006.14560 (Madam, LNS); Shazeer and
Stern, arXiv:1804.04235 (Adafactor's factored second moment).
"""

from __future__ import annotations

import time
from typing import Any

import _harness as harness
import jax
import numpy as np

from madam_examples import lns_digits
from madam_examples import loop
from madam_examples import tasks
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
MIN_DIM_SIZE_TO_FACTOR = 8
LEARNING_RATE = 0.01
CONFIGS = ("madam", "madam factored", "lns int8 factored")
# model: (metric, higher is better, steps, quick steps)
MODELS = {
  "digits MLP": ("accuracy", True, 1000, 20),
  "digits CNN": ("accuracy", True, 1000, 20),
  "Transformer": ("perplexity", False, 400, 10),
}
SEEDS = (0, 1, 2)
# The goal: within 0.5 accuracy points, or 3% perplexity, of float Madam.
ACCURACY_POINTS, PERPLEXITY_RATIO = 0.5, 1.03


def factored_share(params: Any) -> float:
  """Fraction of the multiplicative weights whose second moment is factored
  (their full statistic is a placeholder scalar in the state)."""
  labels = jax.tree.leaves(madam_optax.multiplicative_labels(params))
  weights = [
    x
    for x, label in zip(jax.tree.leaves(params), labels)
    if label == "multiplicative"
  ]
  state = madam_optax.scale_by_factored_second_moment(
    min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR
  ).init(weights)
  factored = [
    x
    for x, full in zip(weights, state.rms_hat)
    if np.shape(full) != np.shape(x)
  ]
  return sum(x.size for x in factored) / sum(x.size for x in weights)


def run(
  task: loop.Task, config: str, seed: int, steps: int, schedule: str
) -> float:
  """The task's metric at the end of one run (``loop.train``)."""
  options = {
    "factored": config != "madam",
    "min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR,
  }
  lns = config == "lns int8 factored"
  _, history = loop.train(
    task,
    "lns_madam" if lns else "madam",
    LEARNING_RATE,
    seed=seed,
    steps=steps,
    eval_every=steps,
    schedule=schedule,
    lns_format=INT8 if lns else None,
    optimizer_options=options,
  )
  return float(history[task.metric][-1])


def build(model: str, steps: int, quick: bool) -> tuple[loop.Task, str]:
  """The model's task and its learning-rate schedule."""
  if model == "Transformer":
    return tasks.build_task("transformer", quick=quick), "cosine"
  return lns_digits.digits_task(model.split()[-1].lower(), steps), "constant"


def summarise(model: str, values: dict[str, list[float]]) -> dict[str, Any]:
  """Means, standard deviations and each configuration's gap to Madam."""
  metric, higher, _, _ = MODELS[model]
  base = np.asarray(values["madam"])
  rows = {}
  for config, v in values.items():
    v = np.asarray(v)
    row = {
      "values": v.tolist(),
      "mean": float(v.mean()),
      "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    }
    if metric == "accuracy":
      gap = base - v  # points lost (paired)
      row["gap"] = float(gap.mean())
      row["within_goal"] = bool(row["gap"] <= ACCURACY_POINTS)
    else:
      gap = v / base - 1.0  # relative perplexity rise
      row["gap"] = float(gap.mean())
      row["within_goal"] = bool(1.0 + row["gap"] <= PERPLEXITY_RATIO)
    row["gap_per_seed"] = gap.tolist()
    rows[config] = row
  return {"metric": metric, "higher_is_better": higher, "configs": rows}


def measure(
  quick: bool = False, seeds=SEEDS, models=tuple(MODELS), log=harness.progress
) -> dict[str, Any]:
  """Runs every model x configuration x seed; returns the results."""
  results = {}
  for model in models:
    _, _, steps, quick_steps = MODELS[model]
    steps = quick_steps if quick else steps
    values = {config: [] for config in CONFIGS}
    t0 = time.perf_counter()
    task, schedule = build(model, steps, quick)
    share = factored_share(loop.reference_params(task)["model"])
    for seed in seeds:
      for config in CONFIGS:
        values[config].append(run(task, config, seed, steps, schedule))
    results[model] = {
      **summarise(model, values),
      "steps": steps,
      "factored_share": share,
      "seconds": time.perf_counter() - t0,
    }
    log(
      f"{model}: "
      + ", ".join(
        f"{c} {r['mean']:.2f}" for c, r in results[model]["configs"].items()
      )
    )
  return results


def markdown_body(results: dict[str, Any]) -> str:
  """The tables below the machine record (from the JSON's contents)."""
  s = results["settings"]
  lines = [
    f"Learning rate {s['learning_rate']} for every configuration; seeds "
    f"{', '.join(map(str, s['seeds']))} (each seed: the same initial "
    "weights and batches in every configuration); matrices factored from "
    f"{s['min_dim_size_to_factor']} rows and columns; int8 codes with 127 "
    "levels and stochastic rounding. Goal: within "
    f"{s['accuracy_points']} accuracy points, or "
    f"{100 * (s['perplexity_ratio'] - 1):.0f}% perplexity, of float Madam. "
    "Cost: the mean over seeds of the paired difference, accuracy points "
    "lost or relative perplexity added (negative: better than Madam).",
    "",
  ]
  for model, r in results["results"].items():
    unit = "points" if r["metric"] == "accuracy" else "relative"
    lines += [
      f"## {model} ({r['metric']}, {r['steps']} steps; "
      f"{100 * r['factored_share']:.0f}% of the weights factored; "
      f"{r['seconds']:.0f} s)",
      "",
      f"| configuration | mean | std | per seed | cost vs madam ({unit}) "
      "| within goal |",
      "|---|---|---|---|---|---|",
    ]
    for config, row in r["configs"].items():
      if config == "madam":
        cost = within = "-"
      else:
        cost = (
          f"{row['gap']:+.2f}"
          if r["metric"] == "accuracy"
          else f"{100 * row['gap']:+.1f}%"
        )
        within = "yes" if row["within_goal"] else "no"
      lines.append(
        f"| {config} | {row['mean']:.2f} | {row['std']:.2f} | "
        f"{', '.join(f'{v:.2f}' for v in row['values'])} | {cost} | "
        f"{within} |"
      )
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
  "The factored second moment: accuracy cost (Madam, factored, int8 LNS)",
  markdown_body,
)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "factored_accuracy")
  parser.add_argument(
    "--models",
    default=",".join(MODELS),
    help="comma-separated subset of: " + ", ".join(MODELS),
  )
  args = harness.parse_args(parser, argv, __file__)
  args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
  for m in args.models:
    if m not in MODELS:
      parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  return args


def main(argv=None, log=harness.progress) -> dict[str, Any]:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  seeds = SEEDS[:1] if args.quick else SEEDS
  results = {
    "machine": harness.machine_record(args.command),
    "settings": {
      "learning_rate": LEARNING_RATE,
      "seeds": list(seeds),
      "min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR,
      "accuracy_points": ACCURACY_POINTS,
      "perplexity_ratio": PERPLEXITY_RATIO,
      "lns_levels": INT8.levels,
    },
  }
  t0 = time.perf_counter()
  results["results"] = measure(args.quick, seeds, args.models, log)
  results["settings"]["wall_seconds"] = round(time.perf_counter() - t0)
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
