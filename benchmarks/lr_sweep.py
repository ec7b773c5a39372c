"""The learning-rate robustness study (arXiv:2006.14560, Figure 1), offline.

For each task (MLP and small CNN on digits, Transformer char LM on
standard-library docstrings, MLP GAN on digits) and each optimizer (Madam,
Adam, SGD with momentum 0.9), trains at lr in {1, 0.1, 0.01, 0.001, 0.0001}
with several seeds and records the final held-out metric. All learning rates
and seeds of one (task, optimizer) pair train together in one jitted
``jax.vmap`` (the learning rate is a traced scalar), so the study compiles 12
programs in all.

Writes, to ``--out``:
  lr_sweep.json  every run's final metric, the settings and the machine;
  lr_sweep.md    the table (mean and standard deviation over seeds) and the
                 summary (Madam's best lr, Madam@0.01 against tuned Adam/SGD);
  lr_sweep.png   metric against lr, one panel per task, one line per optimizer.

  nice python benchmarks/lr_sweep.py       # the full study (28 min on a shared,
                                           # heavily loaded 2-core CPU)
  python benchmarks/lr_sweep.py --quick    # a smoke test (CI), prints
  python benchmarks/lr_sweep.py --tasks mlp,transformer --optimizers madam,adam \
      --steps-factor 4 --name lr_sweep_4x  # the same with 4x the steps
  python benchmarks/lr_sweep.py --replot   # table and figure from the JSON
"""

from __future__ import annotations

import json
import math
import time
import warnings

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np

from madam_examples import loop
from madam_examples import optimizers as optimizers_lib
from madam_examples import tasks as tasks_lib

LEARNING_RATES = (1.0, 0.1, 0.01, 0.001, 0.0001)
OPTIMIZERS = ("madam", "adam", "sgd")
LABELS = {"madam": "Madam", "adam": "Adam", "sgd": "SGD (momentum 0.9)"}
# How close Madam@0.01 must be to the best-tuned Adam to meet the goal:
# accuracy points, or relative gap for perplexity and the GAN's distance.
# Training steps per task in the full study: all 4 x 3 x 5 x 3 runs took 28
# minutes on a 2-core CPU shared with other jobs (load average about 9).
STUDY_STEPS = {"mlp": 500, "cnn": 200, "transformer": 300, "gan": 1000}
QUICK_STEPS = 10
# Every optimizer: cosine decay from the swept (peak) lr to 0 over the run.
SCHEDULE = "cosine"
GOAL = {
  "accuracy": ("abs", 1.0),
  "perplexity": ("rel", 0.03),
  "frechet_distance": ("rel", 0.10),
}


def run_pair(task, optimizer: str, seeds: int, steps: int):
  """Final metric for every (lr, seed): array (len(LEARNING_RATES), seeds).

  One jitted program per (task, optimizer): the learning rates and seeds are
  a ``vmap`` axis; the model is evaluated once, after the last step.
  """
  run = loop.make_run_fn(task, optimizer, steps, steps, schedule=SCHEDULE)
  lrs = jnp.repeat(jnp.asarray(LEARNING_RATES, jnp.float32), seeds)
  keys = jnp.stack(
    [
      jax.random.key_data(jax.random.key(s))
      for _ in LEARNING_RATES
      for s in range(seeds)
    ]
  )
  fn = jax.jit(
    jax.vmap(
      lambda k, lr, d: run(jax.random.wrap_key_data(k), lr, d),
      in_axes=(0, 0, None),
    )
  )
  history = jax.device_get(fn(keys, lrs, task.data))
  final = np.asarray(history[task.metric][:, -1], np.float64)
  return final.reshape(len(LEARNING_RATES), seeds)


def _score(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
  """Non-finite results (diverged runs) count as the worst possible."""
  worst = -np.inf if higher_is_better else np.inf
  return np.where(np.isfinite(values), values, worst)


def summarise(results: dict, tasks: dict) -> dict:
  summary = {}
  for name, per_opt in results.items():
    task = tasks[name]
    hib = task["higher_is_better"]
    pick = np.nanargmax if hib else np.nanargmin
    entry = {}
    for opt, values in per_opt.items():
      v = _score(np.asarray(values, np.float64), hib)
      means = v.mean(axis=1)
      i = int(pick(means))
      entry[opt] = {
        "best_lr": LEARNING_RATES[i],
        "best_mean": float(means[i]),
        "best_std": float(v[i].std()),
        "mean_at_0.01": float(means[LEARNING_RATES.index(0.01)]),
      }
    if "madam" not in entry or "adam" not in entry:
      summary[name] = entry
      continue
    madam, adam = entry["madam"]["mean_at_0.01"], entry["adam"]["best_mean"]
    kind, tol = GOAL[task["metric"]]
    if kind == "abs":
      gap = (madam - adam) if hib else (adam - madam)
      met = gap >= -tol
    else:
      gap = (adam - madam) / adam if not hib else (madam - adam) / adam
      met = gap >= -tol
    entry["madam_at_0.01_vs_best_adam"] = {
      "gap": float(gap),
      "kind": kind,
      "tolerance": tol,
      "met": bool(met),
    }
    entry["madam_best_lr_is_0.01"] = entry["madam"]["best_lr"] == 0.01
    summary[name] = entry
  return summary


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return "diverged"
  return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def markdown_body(results: dict) -> str:
  """The tables and the summary below the machine record (from the JSON)."""
  tasks, settings = results["tasks"], results["settings"]
  summary = summarise(results["results"], tasks)
  command = results["machine"]["command"] or "python benchmarks/lr_sweep.py"
  lines = [
    f"Settings: {json.dumps(settings)}",
    "",
    f"Reproduce: `nice {command}` (then `--replot` with the same "
    "`--name` rewrites this table and the figure from the JSON).",
    "",
    "Each cell: mean ± standard deviation (over seeds, ddof=0) of the final "
    "held-out metric after the last step. A cell with diverged runs "
    "(non-finite metric) says how many; for choosing the best lr they "
    "count as the worst possible value.",
    "",
  ]
  for name, per_opt in results["results"].items():
    t = tasks[name]
    arrow = "higher is better" if t["higher_is_better"] else "lower is better"
    lines += [
      f"## {name}: {t['description']}",
      "",
      f"{t['metric']} ({arrow}), {t['steps']} steps",
      "",
      "| optimizer | "
      + " | ".join(f"lr={lr:g}" for lr in LEARNING_RATES)
      + " |",
      "|---" * (len(LEARNING_RATES) + 1) + "|",
    ]
    for opt, values in per_opt.items():
      v = np.asarray(values, np.float64)
      cells = []
      for row in v:
        if not np.all(np.isfinite(row)):
          bad = int(np.sum(~np.isfinite(row)))
          finite = row[np.isfinite(row)]
          cells.append(
            f"{bad}/{len(row)} diverged"
            + (f", rest {_fmt(finite.mean())}" if len(finite) else "")
          )
        else:
          cells.append(f"{_fmt(row.mean())} ± {_fmt(row.std())}")
      lines.append(f"| {LABELS[opt]} | " + " | ".join(cells) + " |")
    s = summary[name]
    best = ", ".join(
      f"{LABELS[o].split()[0]} {s[o]['best_lr']:g}"
      for o in OPTIMIZERS
      if o in s
    )
    lines += ["", f"Best lr (by mean): {best}."]
    if "madam_at_0.01_vs_best_adam" in s:
      g = s["madam_at_0.01_vs_best_adam"]
      gap = (
        f"{g['gap']:+.2f} points"
        if g["kind"] == "abs"
        else f"{100 * g['gap']:+.1f}%"
      )
      tol = (
        f"{g['tolerance']:g} point"
        if g["kind"] == "abs"
        else f"{100 * g['tolerance']:g}%"
      )
      sgd = f" and best SGD {_fmt(s['sgd']['best_mean'])}" if "sgd" in s else ""
      lines += [
        f"Madam@0.01 {_fmt(s['madam']['mean_at_0.01'])} vs best Adam "
        f"{_fmt(s['adam']['best_mean'])}{sgd}; Madam@0.01 relative to "
        f"best Adam: {gap} (positive = Madam better; goal: no worse than "
        f"-{tol}: {'met' if g['met'] else 'NOT met'})."
      ]
    lines.append("")
  return "\n".join(lines)


def figure(results: dict, plt):
  """Metric against learning rate, one panel per task, a line per optimizer."""
  tasks = results["tasks"]
  names = list(results["results"])
  fig, axes = plt.subplots(
    1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False
  )
  colours = {"madam": "tab:red", "adam": "tab:blue", "sgd": "tab:green"}
  for ax, name in zip(axes[0], names):
    t = tasks[name]
    ax.set_title(f"{name}: {t['steps']} steps", fontsize=10)
    for opt, values in results["results"][name].items():
      v = np.asarray(values, np.float64)
      finite = np.where(np.isfinite(v), v, np.nan)
      with warnings.catch_warnings():  # all-diverged rows: NaN, not plotted
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(finite, axis=1)
        std = np.nanstd(finite, axis=1)
      ax.errorbar(
        LEARNING_RATES,
        mean,
        yerr=std,
        marker="o",
        capsize=3,
        color=colours[opt],
        label=LABELS[opt],
      )
    ax.set_xscale("log")
    if t["metric"] in ("perplexity", "frechet_distance"):
      ax.set_yscale("log")
    ax.axvline(0.01, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="learning rate", ylabel=t["metric"].replace("_", " "))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(
    "Final held-out metric against learning rate "
    "(mean ± std over seeds; diverged runs omitted)",
    fontsize=10,
  )
  return fig


REPORT = harness.Report(
  "Learning-rate study (arXiv:2006.14560, Figure 1 pattern)",
  markdown_body,
  figure,
)


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "lr_sweep")
  parser.add_argument("--tasks", default=",".join(tasks_lib.TASKS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="training steps for every task (default: STUDY_STEPS per task)",
  )
  parser.add_argument(
    "--steps-factor",
    type=int,
    default=1,
    help="multiplies every task's STUDY_STEPS (a longer training budget)",
  )
  args = harness.parse_args(parser, argv, __file__)
  for o in args.optimizers.split(","):
    if o not in OPTIMIZERS:
      parser.error(f"unknown optimizer {o!r}; choose from {OPTIMIZERS}")
  return args


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  seeds = 2 if args.quick else args.seeds
  optimizers = [o for o in args.optimizers.split(",") if o]
  start = time.perf_counter()
  settings = {
    "seeds": seeds,
    "learning_rates": LEARNING_RATES,
    "schedule": SCHEDULE,
    "quick": bool(args.quick),
    "madam_additive_fallback": (
      f"zero-initialised leaves (biases, norm offsets) trained "
      f"by Adam({optimizers_lib.ADDITIVE_FALLBACK_LR:g}) via "
      "madam_optax.with_additive_fallback"
    ),
  }
  results = {
    "machine": harness.machine_record(args.command),
    "settings": settings,
    "tasks": {},
    "learning_rates": LEARNING_RATES,
    "results": {},
    "summary": {},
  }
  for name in args.tasks.split(","):
    task = tasks_lib.build_task(name, quick=args.quick)
    steps = (
      QUICK_STEPS
      if args.quick
      else args.steps or args.steps_factor * STUDY_STEPS[name]
    )
    results["tasks"][name] = {
      "description": task.description,
      "metric": task.metric,
      "higher_is_better": task.higher_is_better,
      "steps": steps,
      "p_scale": task.p_scale,
    }
    results["results"][name] = {}
    for opt in optimizers:
      t0 = time.perf_counter()
      values = run_pair(task, opt, seeds, steps)
      results["results"][name][opt] = values.tolist()
      means = [
        row[np.isfinite(row)].mean() if np.isfinite(row).any() else np.nan
        for row in values
      ]
      log(
        f"[{time.perf_counter() - start:7.1f}s] {name:<11} {opt:<5} "
        f"({time.perf_counter() - t0:5.1f}s) {task.metric} by lr: "
        + " ".join(_fmt(m) for m in means)
      )
    results["summary"] = summarise(results["results"], results["tasks"])
    settings["wall_clock_seconds"] = round(time.perf_counter() - start, 1)
    # Written after every task, so an interrupted study keeps what it has.
    if args.out is not None:
      harness.write_results(args.out, args.name, results, REPORT, log)
  if args.out is None:
    harness.write_results(None, args.name, results, REPORT, log)
  log(f"done in {time.perf_counter() - start:.0f}s")
  return results


if __name__ == "__main__":
  main()
