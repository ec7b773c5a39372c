"""Which learning rate? The robustness study of arXiv:2006.14560, by budget.

The paper's headline (Figure 1): Madam's best learning rate was 0.01 on every
benchmark, while SGD's and Adam's moved by orders of magnitude. This script
measures that claim on the examples' four tasks (an MLP and a small CNN on
the digits, a Transformer character LM on standard-library docstrings, an MLP
GAN on the digits) across training budgets, under the paper's protocol:

* one schedule for every optimizer: the paper's step decay (the rate times
  0.1 at 1/3 and at 2/3 of the run), and cosine decay to 0 as a second arm;
* budgets as multiples of each task's base steps (``BASE_STEPS``): x1, x4
  and x16 for the MLP, CNN and Transformer, x1 and x4 for the GAN; cosine at
  x4 only;
* the rates {1, 0.1, 0.01, 0.001, 0.0001} for Madam, Adam and SGD with
  momentum 0.9, 3 seeds; Madam's ``p_scale`` is the task's (3, the
  Transformer 2), and at x4 also each of {1, 2, 3} (the authors advise
  tuning it in that set).

One *cell* is task x budget x schedule x optimizer (x ``p_scale``): all its
rates and seeds train together in one jitted ``jax.vmap`` (the rate is a
traced scalar), and the final held-out metric of each run is kept. Cells are
written to the JSON one by one as they finish, each with its own machine
record, and ``--resume`` skips the cells already there, so the long arms can
run across sittings and machines; a cell interrupted half-way is never
written. The report is rewritten after every cell, the figures at the end
(``--replot`` draws them from the JSON at any time). The cells run in ``plan`` order: x1 step decay for every task, then
x4 step decay task by task, the x4 cosine arm, then x16.

Writes, to ``--out`` (default ``benchmarks/results``):
  lr_sweep.json      every cell: each run's final metric, the cell's machine;
  lr_sweep.md        the spread of the best rate (the claim in one number),
                     best rates by budget, p_scale, the tables, what ran where;
  lr_sweep.png       metric against rate per task, one panel row per budget,
                     the best rate of each optimizer marked;
  lr_sweep_best.png  best rate against training steps, per task.

  nice python benchmarks/lr_sweep.py --resume   # the whole study, resumable
  nice python benchmarks/lr_sweep.py --resume --budgets 1 --tasks mlp
  python benchmarks/lr_sweep.py --quick         # a smoke test, prints
  python benchmarks/lr_sweep.py --replot        # tables and figures from JSON

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import time
from typing import Any, Callable, NamedTuple, Sequence
import warnings

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import study_tasks as tasks_lib

from madam_examples import loop
from madam_examples import optimizers as optimizers_lib

LEARNING_RATES = (1.0, 0.1, 0.01, 0.001, 0.0001)
# Metrics that span orders of magnitude: compared and drawn on a log scale.
LOG_METRICS = ("perplexity", "frechet_distance")
# The Transformer recipe (madam_optax.partitioned_madam's labels: Madam on the
# hidden weight matrices; embeddings, head, norms and biases to Adam at the
# fixed RECIPE_ADDITIVE_LR under the cell's schedule), as two arms: the
# paper's Madam (b1 = 0) and Madam with a first moment. Step decay only.
RECIPES: dict[str, dict[str, float]] = {
  "recipe": {"b1": 0.0},
  "recipe_b1": {"b1": 0.9},
}
RECIPE_SCHEDULES = ("step",)
RECIPE_ADDITIVE_LR = optimizers_lib.madam_optax.ADDITIVE_LEARNING_RATE
OPTIMIZERS = ("madam", "adam", "sgd", *RECIPES)
LABELS = {
  "madam": "Madam",
  "adam": "Adam",
  "sgd": "SGD (momentum 0.9)",
  "recipe": "Madam recipe (hidden kernels; rest Adam)",
  "recipe_b1": "Madam recipe, b1 0.9",
}
SHORT = {
  "madam": "Madam",
  "adam": "Adam",
  "sgd": "SGD",
  "recipe": "recipe",
  "recipe_b1": "recipe b1",
}
# "step": the paper's step decay; "cosine": decay to 0 over the run;
# "constant": no decay (the examples' default).
SCHEDULES = ("step", "cosine", "constant")
DECAY_AT = (1 / 3, 2 / 3)  # fractions of the run where the rate drops
DECAY_FACTOR = 0.1
# The budget x1: each task's training steps (sized so that the x1 arm runs in
# about half an hour on a shared 2-core CPU). Quick runs use QUICK_STEPS.
BASE_STEPS = {"mlp": 500, "cnn": 200, "transformer": 300, "gan": 1000}
QUICK_STEPS = 10
BUDGETS = (1, 4, 16)
MAX_BUDGET = {"gan": 4}  # the GAN is not run at x16
COSINE_BUDGETS = (4,)  # the cosine arm
P_SCALES = (1.0, 2.0, 3.0)
P_SCALE_BUDGETS = (4,)  # where Madam's p_scale is swept (step decay)


# --------------------------------------------------------------------------
# The plan: which cells, in which order.


class Cell(NamedTuple):
  """One cell of the study: every rate and seed of it train in one program.

  ``p_scale`` is Madam's (``None`` for Adam and SGD).
  """

  task: str
  budget: int
  schedule: str
  optimizer: str
  p_scale: float | None

  @property
  def key(self) -> str:
    """The cell's name in the JSON, e.g. ``"mlp/x4/step/madam/p3"``."""
    name = f"{self.task}/x{self.budget}/{self.schedule}/{self.optimizer}"
    return name if self.p_scale is None else f"{name}/p{self.p_scale:g}"


def _is_madam(optimizer: str) -> bool:
  """Madam, or a recipe arm built on it (the cell carries a ``p_scale``)."""
  return optimizer == "madam" or optimizer in RECIPES


def default_p_scale(task: str) -> float:
  """The task's Madam ``p_scale`` (paper: 2 for the Transformer, else 3)."""
  return 2.0 if task == "transformer" else 3.0


def plan(
  tasks: Sequence[str] = tasks_lib.TASKS,
  budgets: Sequence[int] = BUDGETS,
  schedules: Sequence[str] = ("step", "cosine"),
  optimizers: Sequence[str] = OPTIMIZERS,
  p_scales: Sequence[float] = P_SCALES,
  *,
  cosine_budgets: Sequence[int] = COSINE_BUDGETS,
  p_scale_budgets: Sequence[int] = P_SCALE_BUDGETS,
) -> list[Cell]:
  """The cells of the study, in the order they run.

  Budget by budget; within a budget, the step-decay arm before the others,
  task by task; within a task, Madam at the task's ``p_scale``, Adam, SGD,
  then Madam's other ``p_scales`` (at ``p_scale_budgets``, step decay only).
  Schedules other than step decay run only at ``cosine_budgets``; a task
  runs only up to its ``MAX_BUDGET``.

  Example:
    >>> [c.key for c in plan(["mlp"], [1, 4], ["step"], ["madam"], [1, 3])]
    ['mlp/x1/step/madam/p3', 'mlp/x4/step/madam/p3', 'mlp/x4/step/madam/p1']
  """
  order = sorted(schedules, key=lambda s: s != "step")
  cells = []
  for budget in budgets:
    for schedule in order:
      if schedule != "step" and budget not in cosine_budgets:
        continue
      for task in tasks:
        if budget > MAX_BUDGET.get(task, budget):
          continue
        p0 = default_p_scale(task)
        cells += [
          Cell(task, budget, schedule, o, p0 if _is_madam(o) else None)
          for o in optimizers
          if o not in RECIPES or schedule in RECIPE_SCHEDULES
        ]
        if (
          "madam" in optimizers
          and schedule == "step"
          and budget in p_scale_budgets
        ):
          cells += [
            Cell(task, budget, schedule, "madam", float(p))
            for p in p_scales
            if float(p) != p0
          ]
  return cells


# --------------------------------------------------------------------------
# Running one cell.


def learning_rate_schedule(
  learning_rate: Any, schedule: str, steps: int
) -> Any:
  """The (peak) ``learning_rate`` under ``schedule`` over a run of ``steps``.

  ``"step"`` is the paper's decay: the rate times ``DECAY_FACTOR`` (0.1) from
  step ``steps // 3`` on, and again from ``2 * steps // 3`` on; ``"cosine"``
  and ``"constant"`` are :func:`madam_examples.optimizers.learning_rate_schedule`.

  Example:
    >>> s = learning_rate_schedule(0.5, "step", 9)
    >>> [round(float(s(t)), 6) for t in (0, 2, 3, 5, 6, 8)]
    [0.5, 0.5, 0.05, 0.05, 0.005, 0.005]
  """
  if schedule != "step":
    return optimizers_lib.learning_rate_schedule(learning_rate, schedule, steps)
  boundaries = [int(steps * f) for f in DECAY_AT]
  if len(set(boundaries)) < len(boundaries) or boundaries[0] < 1:
    raise ValueError(f"step decay needs at least 3 steps, not {steps}.")
  return optax.piecewise_constant_schedule(
    learning_rate, dict.fromkeys(boundaries, DECAY_FACTOR)
  )


def optimizer_factory(cell: Cell, steps: int) -> Callable[[Any, Any], Any]:
  """``(learning_rate, params) -> tx`` for ``loop.make_run_fn``.

  The cell's optimizer by name (Madam with the zero-leaf recipe of
  :func:`madam_examples.optimizers.make_optimizer` and the cell's
  ``p_scale``), its rate under the cell's schedule. A recipe arm
  (``RECIPES``) is Madam with ``leaves="recipe"``: Adam at
  ``RECIPE_ADDITIVE_LR`` for the other leaves, under the same schedule.
  """
  p_scale = 3.0 if cell.p_scale is None else cell.p_scale

  def make(learning_rate, params):
    lr = learning_rate_schedule(learning_rate, cell.schedule, steps)
    if cell.optimizer in RECIPES:
      return optimizers_lib.make_optimizer(
        "madam",
        lr,
        params,
        p_scale=p_scale,
        leaves="recipe",
        additive_learning_rate=learning_rate_schedule(
          RECIPE_ADDITIVE_LR, cell.schedule, steps
        ),
        **RECIPES[cell.optimizer],
      )
    # The old arms, as measured: the zero-leaf policy, whatever the model.
    return optimizers_lib.make_optimizer(
      cell.optimizer, lr, params, p_scale=p_scale, leaves="zero"
    )

  return make


def run_cell(task, cell: Cell, seeds: int, steps: int) -> np.ndarray:
  """Final metric of every (rate, seed): array ``(len(LEARNING_RATES), seeds)``.

  One jitted program: the rates and seeds are one ``vmap`` axis; the model
  is evaluated once, after the last step.
  """
  run = loop.make_run_fn(
    task, optimizer_factory(cell, steps), steps, steps, schedule="constant"
  )
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


def _recipe_record(cell: Cell) -> dict[str, Any]:
  """What a recipe cell ran beyond its key: Adam's rate and Madam's ``b1``."""
  if cell.optimizer not in RECIPES:
    return {}
  return {
    "recipe": {
      "labels": "madam_optax.madam_labels (defaults)",
      "additive": f"optax.adam({RECIPE_ADDITIVE_LR:g}), same schedule",
      **RECIPES[cell.optimizer],
    }
  }


# The check that chose RECIPE_ADDITIVE_LR: the Transformer at x4 under step
# decay, Madam (b1 = 0) at two rates against Adam's rate for the other leaves.
CHECK_MADAM_RATES = (0.1, 0.01)
CHECK_ADDITIVE_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CHECK_BUDGET = 4


def additive_rate_check(
  task,
  seeds: int,
  steps: int,
  additive_rates: Sequence[float] = CHECK_ADDITIVE_RATES,
  schedule: str = "step",
) -> dict[str, list[float]]:
  """Final metric over Madam's rate x the additive Adam's rate, ``seeds`` each.

  One jitted ``vmap`` over every (Madam rate in ``CHECK_MADAM_RATES``, Adam
  rate, seed): the recipe (``leaves="recipe"``, ``b1 = 0``) with both rates
  under ``schedule``. Returns ``{"<madam rate>/<adam rate>": [metric per
  seed]}``.
  """

  def make(rates, params):
    return optimizers_lib.make_optimizer(
      "madam",
      learning_rate_schedule(rates[0], schedule, steps),
      params,
      p_scale=default_p_scale(task.name),
      leaves="recipe",
      additive_learning_rate=learning_rate_schedule(rates[1], schedule, steps),
    )

  run = loop.make_run_fn(task, make, steps, steps, schedule="constant")
  pairs = [(m, a) for m in CHECK_MADAM_RATES for a in additive_rates]
  grid = [(m, a, s) for m, a in pairs for s in range(seeds)]
  rates = jnp.asarray([(m, a) for m, a, _ in grid], jnp.float32)
  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for _, _, s in grid])
  fn = jax.jit(
    jax.vmap(
      lambda k, r, d: run(jax.random.wrap_key_data(k), r, d),
      in_axes=(0, 0, None),
    )
  )
  history = jax.device_get(fn(keys, rates, task.data))
  final = np.asarray(history[task.metric][:, -1], np.float64)
  final = final.reshape(len(pairs), seeds)
  return {f"{m:g}/{a:g}": row.tolist() for (m, a), row in zip(pairs, final)}


def _check_grid(check: dict[str, Any]) -> dict[str, list[float]]:
  """The check's ``"<madam>/<adam>" -> values`` (either stored layout)."""
  if "grid" in check:
    return check["grid"]
  return {
    f"{m:g}/{a:g}": check["values"][i][j]
    for i, m in enumerate(check["madam_rates"])
    for j, a in enumerate(check["additive_rates"])
  }


def merge(results: dict[str, Any], path: pathlib.Path, log) -> None:
  """Adds the cells of another results file (same settings) not already here.

  For cells measured in parallel into separate ``--out`` folders.
  """
  other = harness.read_results(path)
  if other["settings"] != results["settings"]:
    raise SystemExit(f"{path} was measured with other settings.")
  new = {k: v for k, v in other["cells"].items() if k not in results["cells"]}
  for name, info in other["tasks"].items():
    if results["tasks"].setdefault(name, info) != info:
      raise SystemExit(f"task {name} differs in {path}.")
  results["cells"].update(new)
  log(f"merged {len(new)} cells from {path}: {', '.join(new) or 'none'}")


# --------------------------------------------------------------------------
# Best rates and their spread: the claim in numbers.


def _score(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
  """Non-finite results (diverged runs) count as the worst possible."""
  worst = -np.inf if higher_is_better else np.inf
  return np.where(np.isfinite(values), values, worst)


def best_rate(values: Any, higher_is_better: bool) -> float | None:
  """The rate whose mean over seeds is best; ``None`` if every run diverged.

  Example:
    >>> best_rate([[50, 60], [90, 92], [95, 97], [80, 80], [1, 2]], True)
    0.01
  """
  v = _score(np.asarray(values, np.float64), higher_is_better)
  means = v.mean(axis=1)
  if not np.isfinite(means).any():
    return None
  i = int(np.argmax(means) if higher_is_better else np.argmin(means))
  return LEARNING_RATES[i]


def overlapping_rates(
  values: Any, higher_is_better: bool, *, log_scale: bool = False
) -> list[float]:
  """The other rates whose mean ± std (over seeds) overlaps the best's.

  The best rate is chosen by the mean; a rate listed here is not clearly
  worse with these seeds. Rates with a diverged run never overlap. With
  ``log_scale`` (perplexity, Fréchet distance: metrics that span orders of
  magnitude) the means and deviations are of the logarithms, so that one
  seed that blew up does not make a rate "overlap" by its huge deviation.

  Example:
    >>> overlapping_rates([[50, 60], [90, 92], [91, 97], [80, 80], [1, 2]],
    ...                   True)
    [0.1]
    >>> bad = [[469.0, 43.0, 91.0], [27, 27, 26], [16, 17, 16], [20, 20, 20],
    ...        [45, 40, 44]]
    >>> overlapping_rates(bad, False), overlapping_rates(bad, False,
    ...                                                  log_scale=True)
    ([1.0], [])
  """
  v = np.asarray(values, np.float64)
  best = best_rate(v, higher_is_better)
  if best is None:
    return []
  finite = np.isfinite(v).all(axis=1)
  if log_scale:
    finite &= (v > 0).all(axis=1)
  v = np.where(finite[:, None], v, 1.0)
  if log_scale:
    v = np.log(v)
  means, stds = v.mean(axis=1), v.std(axis=1)
  i = LEARNING_RATES.index(best)
  return [
    lr
    for j, lr in enumerate(LEARNING_RATES)
    if j != i and finite[j] and abs(means[j] - means[i]) <= stds[j] + stds[i]
  ]


def spread_decades(rates: Sequence[float]) -> float:
  """How far apart rates lie, in decades: ``log10(max / min)``.

  0 means the same rate everywhere; 2 means a factor of 100.

  Example:
    >>> spread_decades([0.1, 0.01, 0.001]), spread_decades([0.01, 0.01])
    (2.0, 0.0)
  """
  return float(round(math.log10(max(rates) / min(rates)), 6))


def cell_from_record(record: dict[str, Any]) -> Cell:
  return Cell(
    record["task"],
    record["budget"],
    record["schedule"],
    record["optimizer"],
    record["p_scale"],
  )


def main_cells(results: dict[str, Any]) -> dict[Cell, dict[str, Any]]:
  """The cells of the main protocol: Madam at its task's ``p_scale`` only."""
  out = {}
  for record in results["cells"].values():
    cell = cell_from_record(record)
    if cell.p_scale in (None, default_p_scale(cell.task)):
      out[cell] = record
  return out


def best_rates(results: dict[str, Any]) -> dict[Cell, float | None]:
  """Each main cell's best rate (mean over seeds; diverged runs worst)."""
  tasks = results["tasks"]
  return {
    c: best_rate(r["values"], tasks[c.task]["higher_is_better"])
    for c, r in main_cells(results).items()
  }


def near_best(values: Any, task: dict[str, Any]) -> list[float]:
  """The best rate, then those that overlap it (:func:`overlapping_rates`).

  ``task`` is the JSON's entry for the task (``metric``,
  ``higher_is_better``); empty if every run diverged.
  """
  hib = task["higher_is_better"]
  best = best_rate(values, hib)
  if best is None:
    return []
  return [best] + overlapping_rates(
    values, hib, log_scale=task["metric"] in LOG_METRICS
  )


def _near_best(results: dict[str, Any]) -> dict[Cell, set[float]]:
  """Each main cell's best rate and the rates that overlap it."""
  tasks = results["tasks"]
  return {
    c: set(near_best(r["values"], tasks[c.task]))
    for c, r in main_cells(results).items()
  }


def spreads(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
  """The spread of each optimizer's best rate, in decades.

  ``"across_tasks"``: for each optimizer, budget and schedule measured on at
  least two tasks, the best rate per task and their spread. ``"across_budgets"``:
  for each optimizer, task and schedule measured at at least two budgets,
  the best rate per budget and their spread. Each also lists, under
  ``"common"``, the rates that are the best or overlap it
  (:func:`overlapping_rates`) in every one of those cells, largest first:
  one rate that is not clearly worse anywhere. Cells where every run
  diverged have no best rate and are left out.
  """
  best = {c: r for c, r in best_rates(results).items() if r is not None}
  near = _near_best(results)
  across_tasks, across_budgets = [], []

  def common(cells):
    return sorted(set.intersection(*(near[c] for c in cells)), reverse=True)

  groups: dict[tuple, dict] = {}
  for c in best:
    groups.setdefault((c.optimizer, c.budget, c.schedule), {})[c.task] = c
  for (opt, budget, schedule), by_task in groups.items():
    if len(by_task) >= 2:
      rates = {t: best[c] for t, c in by_task.items()}
      across_tasks.append(
        {
          "optimizer": opt,
          "budget": budget,
          "schedule": schedule,
          "best": rates,
          "decades": spread_decades(list(rates.values())),
          "common": common(by_task.values()),
        }
      )
  groups = {}
  for c in best:
    groups.setdefault((c.optimizer, c.task, c.schedule), {})[c.budget] = c
  for (opt, task, schedule), by_budget in groups.items():
    if len(by_budget) >= 2:
      by_budget = dict(sorted(by_budget.items()))
      rates = {b: best[c] for b, c in by_budget.items()}
      across_budgets.append(
        {
          "optimizer": opt,
          "task": task,
          "schedule": schedule,
          "best": rates,
          "decades": spread_decades(list(rates.values())),
          "common": common(by_budget.values()),
        }
      )
  order = {o: i for i, o in enumerate(OPTIMIZERS)}
  across_tasks.sort(
    key=lambda s: (
      order[s["optimizer"]],
      s["budget"],
      s["schedule"] != "step",
      s["schedule"],
    )
  )
  across_budgets.sort(
    key=lambda s: (
      order[s["optimizer"]],
      _task_order(s["task"]),
      s["schedule"] != "step",
    )
  )
  return {"across_tasks": across_tasks, "across_budgets": across_budgets}


def _task_order(task: str) -> int:
  return (
    tasks_lib.TASKS.index(task)
    if task in tasks_lib.TASKS
    else len(tasks_lib.TASKS)
  )


# --------------------------------------------------------------------------
# The report.


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return "diverged"
  return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _rate(x: float | None) -> str:
  return "none" if x is None else f"{x:g}"


def _mean_std(row: np.ndarray) -> str:
  if np.all(np.isfinite(row)):
    return f"{_fmt(row.mean())} ± {_fmt(row.std())}"
  bad = int(np.sum(~np.isfinite(row)))
  finite = row[np.isfinite(row)]
  return f"{bad}/{len(row)} diverged" + (
    f", rest {_fmt(finite.mean())}" if len(finite) else ""
  )


def _mean_at_best(record: dict[str, Any], task: dict[str, Any]) -> str:
  """``"0.1: 97.2 ± 0.3"``, and the rates that overlap it (``≈ 0.01``)."""
  near = near_best(record["values"], task)
  if not near:
    return "all diverged"
  rate, close = near[0], near[1:]
  row = np.asarray(record["values"], np.float64)[LEARNING_RATES.index(rate)]
  return f"{_rate(rate)}: {_mean_std(row)}" + (
    " (≈ " + ", ".join(_rate(r) for r in close) + ")" if close else ""
  )


def _sorted_cells(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The cells in plan order (budget, step decay first, task, optimizer)."""

  def key(r):
    return (
      r["budget"],
      r["schedule"] != "step",
      r["schedule"],
      _task_order(r["task"]),
      r["p_scale"] is not None and r["p_scale"] != default_p_scale(r["task"]),
      OPTIMIZERS.index(r["optimizer"]),
      r["p_scale"] or 0.0,
    )

  return sorted(results["cells"].values(), key=key)


def _arms(results: dict[str, Any]) -> list[tuple[int, str]]:
  """The (budget, schedule) pairs measured, in plan order."""
  return sorted(
    {(r["budget"], r["schedule"]) for r in results["cells"].values()},
    key=lambda a: (a[0], a[1] != "step", a[1]),
  )


def _common(spread: dict[str, Any], *, label: bool = True) -> str:
  rates = ", ".join(_rate(r) for r in spread["common"])
  if not label:
    return rates or "none"
  return (
    f"within noise everywhere: {rates}"
    if rates
    else "no common rate within noise"
  )


def _spread_section(results: dict[str, Any]) -> list[str]:
  s = spreads(results)
  lines = [
    "## The claim in one number: spread of the best rate",
    "",
    "For each optimizer, the best rate (by mean over seeds) on each "
    "task, and how far apart those rates lie in decades: "
    "log10(largest / smallest); 0 = the same rate everywhere, 2 = a "
    "factor of 100. The paper's claim is 0 for Madam (0.01 on every "
    'task) and more for Adam and SGD. "Within noise everywhere" '
    "lists the rates that are the best or not clearly worse (mean ± "
    "std over seeds overlapping the best's) in every cell compared.",
    "",
  ]
  arms = [
    a
    for a in _arms(results)
    if any(
      x["budget"] == a[0] and x["schedule"] == a[1] for x in s["across_tasks"]
    )
  ]
  if not arms:
    return lines + ["No budget has been measured on two tasks yet.", ""]
  lines += [
    "### Across tasks, at each budget",
    "",
    "| optimizer | " + " | ".join(f"x{b} {sch}" for b, sch in arms) + " |",
    "|---" * (len(arms) + 1) + "|",
  ]
  for opt in OPTIMIZERS:
    cells = []
    for b, sch in arms:
      hit = [
        x
        for x in s["across_tasks"]
        if x["optimizer"] == opt and x["budget"] == b and x["schedule"] == sch
      ]
      if not hit:
        cells.append("not run")
        continue
      x = hit[0]
      rates = ", ".join(
        f"{t} {_rate(r)}"
        for t, r in sorted(x["best"].items(), key=lambda kv: _task_order(kv[0]))
      )
      cells.append(f"**{x['decades']:g}** ({rates}; {_common(x)})")
    if any(c != "not run" for c in cells):
      lines.append(f"| {SHORT[opt]} | " + " | ".join(cells) + " |")
  lines += [""]
  if s["across_budgets"]:
    lines += [
      "### Across budgets, per task",
      "",
      "| optimizer | task | schedule | best rate by budget "
      "(steps) | spread (decades) | within noise at every budget |",
      "|---|---|---|---|---|---|",
    ]
    steps = {
      (r["task"], r["budget"]): r["steps"] for r in results["cells"].values()
    }
    for x in s["across_budgets"]:
      by = ", ".join(
        f"x{b} ({steps[(x['task'], b)]}): {_rate(r)}"
        for b, r in x["best"].items()
      )
      lines.append(
        f"| {SHORT[x['optimizer']]} | {x['task']} | "
        f"{x['schedule']} | {by} | **{x['decades']:g}** | "
        f"{_common(x, label=False)} |"
      )
    lines += [""]
  return lines


def _best_section(results: dict[str, Any]) -> list[str]:
  tasks = results["tasks"]
  lines = [
    "## Best rate of each optimizer, by task and budget",
    "",
    "Best rate, and the metric there (mean ± std over seeds); "
    "after ≈, the other rates whose mean ± std overlaps the best's "
    "(not clearly worse with these seeds; for perplexity and Fréchet "
    "distance, mean ± std of the logarithms). Madam at the task's "
    "`p_scale`.",
    "",
    "| task (metric) | budget | steps | schedule | "
    + " | ".join(SHORT[o] for o in OPTIMIZERS)
    + " |",
    "|---" * (4 + len(OPTIMIZERS)) + "|",
  ]
  main = main_cells(results)
  rows = sorted(
    {(c.task, c.budget, c.schedule) for c in main},
    key=lambda r: (_task_order(r[0]), r[1], r[2] != "step"),
  )
  for task, budget, schedule in rows:
    t = tasks[task]
    cells = []
    steps = None
    for opt in OPTIMIZERS:
      hit = [
        c
        for c in main
        if (c.task, c.budget, c.schedule, c.optimizer)
        == (task, budget, schedule, opt)
      ]
      if not hit:
        cells.append("not run")
        continue
      steps = main[hit[0]]["steps"]
      cells.append(_mean_at_best(main[hit[0]], t))
    lines.append(
      f"| {task} ({t['metric'].replace('_', ' ')}) | x{budget} | "
      f"{steps} | {schedule} | " + " | ".join(cells) + " |"
    )
  return lines + [""]


def _p_scale_section(results: dict[str, Any]) -> list[str]:
  tasks = results["tasks"]
  records = [r for r in results["cells"].values() if r["optimizer"] == "madam"]
  groups: dict[tuple, dict] = {}
  for r in records:
    groups.setdefault((r["task"], r["budget"], r["schedule"]), {})[
      r["p_scale"]
    ] = r
  groups = {k: v for k, v in groups.items() if len(v) >= 2}
  lines = ["## Madam's `p_scale`", ""]
  if not groups:
    return lines + [
      "Not measured yet: no task has Madam cells at two `p_scale` values.",
      "",
    ]
  p_all = sorted({p for v in groups.values() for p in v})
  lines += [
    "Madam's best rate and the metric there, by `p_scale` (the "
    "weight bound as a multiple of each tensor's initial RMS); ≈ as "
    "above.",
    "",
    "| task | budget | schedule | "
    + " | ".join(f"p_scale {p:g}" for p in p_all)
    + " |",
    "|---" * (3 + len(p_all)) + "|",
  ]
  for (task, budget, schedule), by_p in sorted(
    groups.items(), key=lambda kv: (_task_order(kv[0][0]), kv[0][1])
  ):
    cells = []
    for p in p_all:
      if p not in by_p:
        cells.append("not run")
        continue
      cells.append(_mean_at_best(by_p[p], tasks[task]))
    lines.append(
      f"| {task} | x{budget} | {schedule} | " + " | ".join(cells) + " |"
    )
  return lines + [""]


def _tables_section(results: dict[str, Any]) -> list[str]:
  tasks = results["tasks"]
  lines = [
    "## Every cell",
    "",
    "Mean ± standard deviation (over seeds, ddof=0) of the final "
    "held-out metric after the last step. A cell with diverged runs "
    "(non-finite metric) says how many; for choosing the best rate "
    "they count as the worst possible value.",
    "",
  ]
  groups: dict[tuple, list] = {}
  for r in _sorted_cells(results):
    groups.setdefault((r["task"], r["budget"], r["schedule"]), []).append(r)
  for (task, budget, schedule), records in sorted(
    groups.items(),
    key=lambda kv: (_task_order(kv[0][0]), kv[0][1], kv[0][2] != "step"),
  ):
    t = tasks[task]
    arrow = "higher is better" if t["higher_is_better"] else "lower is better"
    lines += [
      f"### {task} x{budget}, {schedule}: {t['description']}",
      "",
      f"{t['metric']} ({arrow}), {records[0]['steps']} steps",
      "",
      "| optimizer | "
      + " | ".join(f"lr={lr:g}" for lr in LEARNING_RATES)
      + " | best |",
      "|---" * (len(LEARNING_RATES) + 2) + "|",
    ]
    for r in records:
      label = LABELS[r["optimizer"]]
      if r["p_scale"] is not None:
        label += f", p_scale {r['p_scale']:g}"
      v = np.asarray(r["values"], np.float64)
      lines.append(
        f"| {label} | "
        + " | ".join(_mean_std(row) for row in v)
        + f" | {_rate(best_rate(v, t['higher_is_better']))} |"
      )
    lines.append("")
  return lines


def _remaining_section(results: dict[str, Any]) -> list[str]:
  done = set(results["cells"])
  todo = [c.key for c in plan() if c.key not in done]
  lines = ["## Cells of the full study not measured yet", ""]
  if not todo:
    return lines + ["None: every cell of the full study is measured.", ""]
  return lines + [
    f"{len(todo)} of {len(plan())}: " + ", ".join(f"`{k}`" for k in todo) + ".",
    "",
    "Resume with `nice python benchmarks/lr_sweep.py --resume`.",
    "",
  ]


def _where_section(results: dict[str, Any]) -> list[str]:
  lines = [
    "## Where each cell ran",
    "",
    "The code column is the commit each cell ran at (`+modified`: with "
    "uncommitted changes to the code); cells from before the record kept "
    "it say `not recorded`.",
    "",
    "| cell | steps | seconds | date | code | command | machine | backend "
    "| load at start |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in _sorted_cells(results):
    m = r["machine"]
    code = r.get("code") or "not recorded"
    lines.append(
      f"| `{cell_from_record(r).key}` | {r['steps']} | {r['seconds']:.0f} "
      f"| {m['date_utc']} | {code} | `{m['command']}` | {m['cpu']}, "
      f"{m['cores']} cores | {m['backend']}: {m['devices']} | "
      f"{m['load_average_at_start']} |"
    )
  return lines + [""]


def markdown_body(results: dict[str, Any]) -> str:
  """The report below the machine record (read from the JSON only)."""
  settings = results["settings"]
  lines = [
    f"Settings: {json.dumps(settings)}",
    "",
    "Protocol: every optimizer under the same schedule, the rate swept "
    "over " + ", ".join(f"{lr:g}" for lr in LEARNING_RATES) + "; `step` is "
    "the paper's step decay (the rate x0.1 at 1/3 and at 2/3 of the run), "
    "`cosine` decays it to 0. A budget xN is N times the task's base "
    "steps. The machine above is the last sitting's; each cell's own is "
    "in the last table.",
    "",
    "Reproduce or continue: `nice python benchmarks/lr_sweep.py --resume` "
    "(`--replot` rewrites this report and the figures from the JSON).",
    "",
  ]
  if not results["cells"]:
    return "\n".join(lines + ["No cell has been measured yet.", ""])
  lines += _spread_section(results)
  lines += _best_section(results)
  lines += _p_scale_section(results)
  lines += _tables_section(results)
  lines += _remaining_section(results)
  lines += _where_section(results)
  return "\n".join(lines)


# Log-scale panels show up to CLIP times the panel's best mean.
CLIP = 30.0
COLOURS = {
  "madam": "tab:red",
  "adam": "tab:blue",
  "sgd": "tab:green",
  "recipe": "tab:purple",
  "recipe_b1": "tab:orange",
}
P_STYLES = {1.0: ":", 2.0: "-.", 3.0: "--"}


def _curve(values: Any) -> tuple[np.ndarray, np.ndarray]:
  v = np.asarray(values, np.float64)
  finite = np.where(np.isfinite(v), v, np.nan)
  with warnings.catch_warnings():  # all-diverged rows: NaN, not plotted
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(finite, axis=1), np.nanstd(finite, axis=1)


def figure(results: dict[str, Any], plt):
  """Metric against rate per task (columns), one row per budget and schedule.

  Solid lines: each optimizer (Madam at the task's ``p_scale``); a star marks
  its best rate. Madam at its other ``p_scale`` values: thin broken lines.
  """
  tasks = results["tasks"]
  names = sorted(tasks, key=_task_order)
  if not names:
    fig = plt.figure(figsize=(4, 2))
    fig.text(0.5, 0.5, "No cell measured yet", ha="center")
    return fig
  arms = _arms(results)
  fig, axes = plt.subplots(
    len(arms),
    len(names),
    figsize=(3.6 * len(names), 2.9 * len(arms)),
    squeeze=False,
  )
  for row, (budget, schedule) in zip(axes, arms):
    for ax, name in zip(row, names):
      t = tasks[name]
      records = [
        r
        for r in _sorted_cells(results)
        if r["task"] == name
        and r["budget"] == budget
        and r["schedule"] == schedule
      ]
      if not records:
        ax.set_axis_off()
        ax.text(
          0.5,
          0.5,
          f"{name} x{budget} {schedule}:\nnot run",
          ha="center",
          va="center",
          fontsize=9,
          color="grey",
        )
        continue
      ax.set_title(
        f"{name} x{budget} ({records[0]['steps']} steps), {schedule}",
        fontsize=9,
      )
      for r in records:
        opt, p = r["optimizer"], r["p_scale"]
        mean, std = _curve(r["values"])
        main = p in (None, default_p_scale(name))
        label = SHORT[opt] if main else f"Madam p_scale {p:g}"
        ax.errorbar(
          LEARNING_RATES,
          mean,
          yerr=std if main else None,
          marker="o" if main else None,
          ms=3,
          capsize=2,
          color=COLOURS[opt],
          lw=1.5 if main else 1.0,
          ls="-" if main else P_STYLES.get(p, "--"),
          alpha=1.0 if main else 0.7,
          label=label,
        )
        rate = best_rate(r["values"], t["higher_is_better"])
        if main and rate is not None:
          i = LEARNING_RATES.index(rate)
          ax.plot(
            [rate],
            [mean[i]],
            marker="*",
            ms=13,
            color=COLOURS[opt],
            markeredgecolor="black",
            ls="none",
          )
      ax.set_xscale("log")
      if t["metric"] in LOG_METRICS:
        ax.set_yscale("log")
        # Runs that blew up (perplexity 1e10) would flatten the rest.
        low = min(np.nanmin(_curve(r["values"])[0]) for r in records)
        if np.isfinite(low) and ax.get_ylim()[1] > CLIP * low:
          ax.set_ylim(top=CLIP * low)
      ax.axvline(0.01, color="grey", lw=0.8, ls=":")
      ax.set_xlabel("learning rate", fontsize=8)
      ax.set_ylabel(t["metric"].replace("_", " "), fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6)
  fig.suptitle(
    "Final held-out metric against learning rate\n(mean ± std "
    "over seeds; star: best rate; diverged runs omitted; log "
    f"axes show up to {CLIP:g}x the best)",
    fontsize=10,
  )
  return fig


def best_rate_figure(results: dict[str, Any], plt):
  """Best rate against training steps, one panel per task.

  One line per optimizer under step decay (Madam at the task's
  ``p_scale``); hollow markers: the cosine arm.
  """
  tasks = results["tasks"]
  names = sorted(tasks, key=_task_order)
  if not names:
    fig = plt.figure(figsize=(4, 2))
    fig.text(0.5, 0.5, "No cell measured yet", ha="center")
    return fig
  fig, axes = plt.subplots(
    1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False
  )
  best = best_rates(results)
  steps = {c.key: r["steps"] for c, r in main_cells(results).items()}
  for ax, name in zip(axes[0], names):
    for k, opt in enumerate(OPTIMIZERS):
      # A small vertical offset per optimizer keeps equal rates visible.
      nudge = 10 ** (0.06 * (k - 1))
      for schedule, filled in (("step", True), ("cosine", False)):
        points = sorted(
          (steps[c.key], rate)
          for c, rate in best.items()
          if c.task == name
          and c.optimizer == opt
          and c.schedule == schedule
          and rate is not None
        )
        if not points:
          continue
        x, y = zip(*points)
        x = np.asarray(x, np.float64) * (1.0 if filled else 1.12)
        ax.plot(
          x,
          np.asarray(y) * nudge,
          marker="o",
          color=COLOURS[opt],
          ls="-" if filled else "none",
          mfc=COLOURS[opt] if filled else "none",
          ms=6,
          label=SHORT[opt] + ("" if filled else ", cosine"),
        )
    ax.set_xscale("log")
    ticks = sorted(
      {r["steps"] for c, r in main_cells(results).items() if c.task == name}
    )
    if ticks:
      ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
      ax.set_xticks(ticks)
      ax.set_xticklabels([str(x) for x in ticks], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(LEARNING_RATES[-1] / 3, LEARNING_RATES[0] * 3)
    ax.set_yticks(LEARNING_RATES)
    ax.set_yticklabels([f"{lr:g}" for lr in LEARNING_RATES], fontsize=7)
    ax.minorticks_off()
    ax.tick_params(labelsize=7)
    ax.set_title(
      f"{name}: {tasks[name]['metric'].replace('_', ' ')}", fontsize=9
    )
    ax.set_xlabel("training steps", fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("best learning rate", fontsize=8)
  for ax in axes[0]:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
      break
  fig.suptitle(
    "Best learning rate against training steps\n(step decay; hollow: cosine)",
    fontsize=10,
  )
  return fig


REPORT = harness.Report(
  "Which learning rate? The robustness study (arXiv:2006.14560, Figure 1) "
  "by budget",
  markdown_body,
  figure,
)


def write_best_rate_figure(
  out: pathlib.Path, name: str, results: dict[str, Any]
) -> pathlib.Path:
  """Writes ``<name>_best.png`` (:func:`best_rate_figure`)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig = best_rate_figure(results, plt)
  fig.tight_layout()
  path = out / f"{name}_best.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def save(
  out: pathlib.Path | None,
  name: str,
  results: dict[str, Any],
  log: Callable[..., Any],
  *,
  figures: bool = True,
) -> None:
  """Writes the JSON and the report (and the figures).

  The JSON is replaced atomically, so a run stopped at any moment leaves the
  last complete one. With ``out=None`` the report is logged instead.
  """
  if out is None:
    harness.write_results(None, name, results, REPORT, log)
    return
  results["machine"]["load_average_at_end"] = harness.load_average()
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  tmp = out / f"{name}.json.tmp"
  tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
  os.replace(tmp, path)
  paths = [path]
  if figures:
    paths += harness.render(out, name, results, REPORT)
    paths.append(write_best_rate_figure(out, name, results))
  else:
    paths.append(out / f"{name}.md")
    paths[-1].write_text(
      harness.markdown(name, results, REPORT), encoding="utf-8"
    )
  log("wrote " + ", ".join(str(p) for p in paths))


def replot(
  out: pathlib.Path | None, name: str, log: Callable[..., Any]
) -> dict[str, Any]:
  """Rewrites the report and both figures from ``<out>/<name>.json``."""
  out = harness.RESULTS_DIR if out is None else out
  results = harness.replot(out, name, REPORT, log)
  log(f"rewrote {write_best_rate_figure(out, name, results)}")
  return results


# --------------------------------------------------------------------------
# The command line.


def _csv(kind: Callable[[str], Any], choices: Sequence[Any] | None = None):
  def parse(text: str) -> list[Any]:
    values = [kind(x) for x in text.split(",") if x]
    bad = [v for v in values if choices is not None and v not in choices]
    if bad or not values:
      raise argparse.ArgumentTypeError(
        f"{text!r}: give a comma-separated list"
        + (f" from {', '.join(map(str, choices))}" if choices else "")
      )
    return values

  return parse


def parse_args(argv=None):
  parser = harness.argument_parser(__doc__, "lr_sweep")
  parser.add_argument(
    "--tasks", type=_csv(str, tasks_lib.TASKS), default=list(tasks_lib.TASKS)
  )
  parser.add_argument(
    "--optimizers", type=_csv(str, OPTIMIZERS), default=list(OPTIMIZERS)
  )
  parser.add_argument(
    "--budgets",
    type=_csv(int),
    default=list(BUDGETS),
    help="multiples of each task's base steps (default "
    "1,4,16; the GAN stops at 4)",
  )
  parser.add_argument(
    "--schedules",
    type=_csv(str, SCHEDULES),
    default=["step", "cosine"],
    help="step decay at every budget; the others only at --cosine-budgets",
  )
  parser.add_argument(
    "--cosine-budgets", type=_csv(int), default=list(COSINE_BUDGETS)
  )
  parser.add_argument(
    "--p-scales",
    type=_csv(float),
    default=list(P_SCALES),
    help="Madam's p_scale values swept at --p-scale-budgets (step decay)",
  )
  parser.add_argument(
    "--p-scale-budgets", type=_csv(int), default=list(P_SCALE_BUDGETS)
  )
  parser.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="seeds per rate (default 3; 2 with --quick)",
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="base steps for every task (default BASE_STEPS; "
    "QUICK_STEPS with --quick)",
  )
  parser.add_argument(
    "--check-additive-rates",
    action="store_true",
    help="run only the check that chose the recipe's Adam rate (the "
    "Transformer at x4, Madam 0.1 and 0.01 x Adam 1e-3 ... 3e-2) and keep it "
    "in the JSON under additive_rate_check",
  )
  parser.add_argument(
    "--merge",
    type=pathlib.Path,
    nargs="+",
    help="add the cells of these results files (measured in parallel into "
    "other --out folders) to <out>/<name>.json, then rewrite the report",
  )
  parser.add_argument(
    "--resume",
    action="store_true",
    help="keep the cells of <out>/<name>.json and run only the others",
  )
  args = harness.parse_args(parser, argv, __file__)
  if any(b < 1 for b in args.budgets):
    parser.error("--budgets must be positive integers")
  return args


# Paths whose changes would change what a cell measures (not the results).
CODE_PATHS = (
  "madam_optax",
  "madam_examples",
  "benchmarks",
  ":!benchmarks/results",
)


def code_version() -> str | None:
  """The commit the code runs at: ``git describe``-like, ``None`` outside git.

  ``"<commit>"``, or ``"<commit>+modified"`` when the library, the examples
  or the benchmarks differ from it in the working tree (the results folder
  does not count). Each cell records the version it ran at.
  """
  root = pathlib.Path(__file__).resolve().parent.parent

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()

  try:
    commit = git("rev-parse", "--short=12", "HEAD")
    changed = git(
      "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+modified" if changed else "")


def _study_settings(seeds: int, quick: bool) -> dict[str, Any]:
  return {
    "seeds": seeds,
    "learning_rates": list(LEARNING_RATES),
    "quick": quick,
    "step_decay": {
      "at_fractions": [round(f, 6) for f in DECAY_AT],
      "factor": DECAY_FACTOR,
    },
    "madam_additive_fallback": (
      f"zero-initialised leaves (biases, norm offsets) trained by "
      f"Adam({optimizers_lib.ADDITIVE_FALLBACK_LR:g}), unscheduled, "
      "via madam_optax.with_additive_fallback"
    ),
  }


def _start(args, seeds: int, log) -> dict[str, Any]:
  """The results to add cells to: the saved ones with ``--resume``, or new."""
  results = {
    "machine": harness.machine_record(args.command),
    "settings": _study_settings(seeds, bool(args.quick)),
    "tasks": {},
    "cells": {},
  }
  path = None if args.out is None else args.out / f"{args.name}.json"
  if not args.resume or path is None or not path.exists():
    return results
  saved = harness.read_results(path)
  if "cells" not in saved:
    raise SystemExit(
      f"{path} holds results in an earlier format (no "
      "cells); move it away, or run without --resume."
    )
  if saved["settings"] != results["settings"]:
    raise SystemExit(
      f"{path} was measured with other settings: "
      f"{json.dumps(saved['settings'])}; this run has "
      f"{json.dumps(results['settings'])}. Use another --name or --out."
    )
  log(f"resuming: {len(saved['cells'])} cells already in {path}")
  return {**saved, "machine": results["machine"]}


def main(argv=None, log=harness.progress) -> dict:
  args = parse_args(argv)
  if args.replot:
    return replot(args.out, args.name, log)
  seeds = args.seeds or (2 if args.quick else 3)
  results = _start(args, seeds, log)
  if args.merge:
    for path in args.merge:
      merge(results, path, log)
    save(args.out, args.name, results, log)
    return results
  if args.check_additive_rates:
    task = tasks_lib.build_task("transformer", quick=args.quick)
    base = args.steps or (QUICK_STEPS if args.quick else BASE_STEPS[task.name])
    check = results.get("additive_rate_check", {})
    grid = _check_grid(check) if check else {}
    todo = [
      a
      for a in CHECK_ADDITIVE_RATES
      if any(f"{m:g}/{a:g}" not in grid for m in CHECK_MADAM_RATES)
    ]
    t0 = time.perf_counter()
    if todo:
      grid.update(additive_rate_check(task, seeds, CHECK_BUDGET * base, todo))
    runs = check.get("runs", [])
    if "values" in check:  # the first run, before the grid layout
      runs = [{k: check[k] for k in ("seconds", "machine", "code")}]
    runs.append(
      {
        "additive_rates": todo,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": harness.machine_record(args.command),
        "code": code_version(),
      }
    )
    results["additive_rate_check"] = {
      "task": task.name,
      "schedule": "step",
      "steps": CHECK_BUDGET * base,
      "grid": grid,
      "runs": runs,
    }
    log(
      "additive-rate check: "
      + ", ".join(f"{k}: {np.mean(v):.3f}" for k, v in grid.items())
    )
    save(args.out, args.name, results, log, figures=False)
    return results
  cells = plan(
    args.tasks,
    args.budgets,
    args.schedules,
    args.optimizers,
    args.p_scales,
    cosine_budgets=args.cosine_budgets,
    p_scale_budgets=args.p_scale_budgets,
  )
  todo = [c for c in cells if c.key not in results["cells"]]
  log(
    f"{len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)}"
  )
  start, built, code = time.perf_counter(), {}, code_version()
  for cell in todo:
    if cell.task not in built:
      built[cell.task] = tasks_lib.build_task(cell.task, quick=args.quick)
    task = built[cell.task]
    base = args.steps or (QUICK_STEPS if args.quick else BASE_STEPS[cell.task])
    info = {
      "description": task.description,
      "metric": task.metric,
      "higher_is_better": task.higher_is_better,
      "base_steps": base,
    }
    known = results["tasks"].setdefault(cell.task, info)
    if known != info:
      raise SystemExit(
        f"task {cell.task} differs from the saved one: {known} against {info}."
      )
    steps = cell.budget * base
    record = harness.machine_record(args.command)
    t0 = time.perf_counter()
    values = run_cell(task, cell, seeds, steps)
    seconds = time.perf_counter() - t0
    record["load_average_at_end"] = harness.load_average()
    results["cells"][cell.key] = {
      **cell._asdict(),
      **_recipe_record(cell),
      "steps": steps,
      "values": values.tolist(),
      "seconds": round(seconds, 1),
      "code": code,
      "machine": record,
    }
    means, _ = _curve(values)
    log(
      f"[{time.perf_counter() - start:7.1f}s] {cell.key:<28} "
      f"({seconds:6.1f}s) {task.metric} by lr: "
      + " ".join(_fmt(m) for m in means)
    )
    if args.out is not None:  # every finished cell is kept at once
      save(args.out, args.name, results, log, figures=False)
  if todo or args.out is None:
    save(args.out, args.name, results, log)
  log(f"done in {time.perf_counter() - start:.0f}s")
  return results


if __name__ == "__main__":
  main()
