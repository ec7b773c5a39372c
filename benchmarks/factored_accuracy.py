"""What the factored second moment costs in accuracy: Madam, Madam factored, int8.

Three configurations at the same learning rate, steps, batches and initial
weights, on the examples' models and training code:

* ``madam``: ``madam_optax.madam()`` (full second moment, float32 weights);
* ``madam factored``: ``madam(factored=True)``;
* ``lns int8 factored``: ``lns_madam(fmt, factored=True)`` on 127-level
  ``int8`` codes (stochastic rounding).

Models: the LNS digits MLP and CNN of ``madam_examples.lns_digits`` (test
accuracy, constant learning rate, that example's ``train_float_madam_nnx`` and
``train_lns_nnx``), and the character Transformer of
``madam_examples.train`` (validation perplexity, cosine decay; float runs
through ``train.train_chunk``, the int8 run through
``madam_examples.lns_transformer.train_lns``). Zero-initialised leaves are
trained by Adam in every configuration (``with_additive_fallback``). The
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
from flax import nnx
import jax
import numpy as np
import optax

from madam_examples import lns_digits
from madam_examples import lns_transformer
from madam_examples import train as train_lib
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
  weights = [x for x, label in zip(jax.tree.leaves(params), labels)
             if label == "multiplicative"]
  state = madam_optax.scale_by_factored_second_moment(
      min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR).init(weights)
  factored = [x for x, full in zip(weights, state.rms)
              if np.shape(full) != np.shape(x)]
  return sum(x.size for x in factored) / sum(x.size for x in weights)


def run_digits(model_name: str, config: str, seed: int, steps: int,
               data: lns_digits.Digits) -> float:
  """Test accuracy (%) of one digits run (the lns_digits example's code)."""
  model = lns_digits.MODELS[model_name](nnx.Rngs(seed))
  kwargs = {"steps": steps, "seed": seed,
            "min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR}
  if config == "lns int8 factored":
    accuracy, _ = lns_digits.train_lns_nnx(model, data, INT8, factored=True,
                                           **kwargs)
    return accuracy
  return lns_digits.train_float_madam_nnx(
      model, data, factored=config == "madam factored", **kwargs)


def train_float_madam(task: train_lib.Task, seed: int, steps: int, *,
                      factored: bool) -> dict[str, float]:
  """``train.train(task, "madam", ...)`` with ``factored`` passed to Madam."""
  lr = train_lib.learning_rate_schedule(LEARNING_RATE, "cosine", steps)
  txs = {"model": madam_optax.with_additive_fallback(
      train_lib.reference_params(task)["model"],
      madam_optax.madam(lr, p_scale=task.p_scale, factored=factored,
                        min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR),
      optax.adam(train_lib.ADDITIVE_FALLBACK_LR))}
  state = jax.jit(lambda k: train_lib.init_state(task, txs, k))(
      jax.random.key(seed))
  state, _ = jax.jit(lambda s, d: train_lib.train_chunk(
      task, txs, s, d, steps))(state, task.data)
  metrics = jax.jit(task.evaluate)(state.params, task.data)
  return {k: float(v) for k, v in metrics.items()}


def run_transformer(task: train_lib.Task, config: str, seed: int,
                    steps: int) -> float:
  """Validation perplexity of one Transformer run."""
  if config == "lns int8 factored":
    _, metrics = lns_transformer.train_lns(
        task, INT8, LEARNING_RATE, seed=seed, steps=steps, factored=True,
        min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR)
  else:
    metrics = train_float_madam(task, seed, steps,
                                factored=config == "madam factored")
  return metrics["perplexity"]


def summarise(model: str, values: dict[str, list[float]]) -> dict[str, Any]:
  """Means, standard deviations and each configuration's gap to Madam."""
  metric, higher, _, _ = MODELS[model]
  base = np.asarray(values["madam"])
  rows = {}
  for config, v in values.items():
    v = np.asarray(v)
    row = {"values": v.tolist(), "mean": float(v.mean()),
           "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}
    if metric == "accuracy":
      gap = base - v                               # points lost (paired)
      row["gap"] = float(gap.mean())
      row["within_goal"] = bool(row["gap"] <= ACCURACY_POINTS)
    else:
      gap = v / base - 1.0                         # relative perplexity rise
      row["gap"] = float(gap.mean())
      row["within_goal"] = bool(1.0 + row["gap"] <= PERPLEXITY_RATIO)
    row["gap_per_seed"] = gap.tolist()
    rows[config] = row
  return {"metric": metric, "higher_is_better": higher, "configs": rows}


def measure(quick: bool = False, seeds=SEEDS, models=tuple(MODELS),
            log=harness.progress) -> dict[str, Any]:
  """Runs every model x configuration x seed; returns the results."""
  results = {}
  digits = lns_digits.load_digits()
  for model in models:
    _, _, steps, quick_steps = MODELS[model]
    steps = quick_steps if quick else steps
    values = {config: [] for config in CONFIGS}
    t0 = time.perf_counter()
    if model == "Transformer":
      task = train_lib.build_task("transformer", quick=quick)
      share = factored_share(train_lib.reference_params(task)["model"])
      for seed in seeds:
        for config in CONFIGS:
          values[config].append(run_transformer(task, config, seed, steps))
    else:
      name = model.split()[-1].lower()
      share = factored_share(nnx.state(lns_digits.MODELS[name](nnx.Rngs(0)),
                                       nnx.Param))
      for seed in seeds:
        for config in CONFIGS:
          values[config].append(run_digits(name, config, seed, steps, digits))
    results[model] = {**summarise(model, values), "steps": steps,
                      "factored_share": share,
                      "seconds": time.perf_counter() - t0}
    log(f"{model}: " + ", ".join(
        f"{c} {r['mean']:.2f}" for c, r in results[model]["configs"].items()))
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
      ""]
  for model, r in results["results"].items():
    unit = "points" if r["metric"] == "accuracy" else "relative"
    lines += [
        f"## {model} ({r['metric']}, {r['steps']} steps; "
        f"{100 * r['factored_share']:.0f}% of the weights factored; "
        f"{r['seconds']:.0f} s)", "",
        f"| configuration | mean | std | per seed | cost vs madam ({unit}) "
        "| within goal |",
        "|---|---|---|---|---|---|"]
    for config, row in r["configs"].items():
      if config == "madam":
        cost = within = "-"
      else:
        cost = (f"{row['gap']:+.2f}" if r["metric"] == "accuracy"
                else f"{100 * row['gap']:+.1f}%")
        within = "yes" if row["within_goal"] else "no"
      lines.append(
          f"| {config} | {row['mean']:.2f} | {row['std']:.2f} | "
          f"{', '.join(f'{v:.2f}' for v in row['values'])} | {cost} | "
          f"{within} |")
    lines.append("")
  return "\n".join(lines)


REPORT = harness.Report(
    "The factored second moment: accuracy cost (Madam, factored, int8 LNS)",
    markdown_body)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "factored_accuracy")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated subset of: " + ", ".join(MODELS))
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
  results = {"machine": harness.machine_record(args.command),
             "settings": {"learning_rate": LEARNING_RATE,
                          "seeds": list(seeds),
                          "min_dim_size_to_factor": MIN_DIM_SIZE_TO_FACTOR,
                          "accuracy_points": ACCURACY_POINTS,
                          "perplexity_ratio": PERPLEXITY_RATIO,
                          "lns_levels": INT8.levels}}
  t0 = time.perf_counter()
  results["results"] = measure(args.quick, seeds, args.models, log)
  results["settings"]["wall_seconds"] = round(time.perf_counter() - t0)
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
