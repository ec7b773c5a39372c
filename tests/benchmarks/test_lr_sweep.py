"""``benchmarks/lr_sweep.py``: the learning-rate study by budget.

The fast tests replace the training of a cell (``run_cell``) by a function
of the cell, so they check the plan, resuming, the spread of the best rates
and the report without training; the slow one trains a few steps for real.
"""

import json
import math
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def lr_sweep(benchmark):
  return benchmark("lr_sweep")


def fake_values(cell, seeds, steps):
  """Deterministic stand-in results: the best rate moves with the budget."""
  rates = np.log10(np.asarray([1.0, 0.1, 0.01, 0.001, 0.0001]))
  peak = (
    -1.0
    - 0.3 * math.log2(cell.budget)
    - (1.0 if cell.optimizer == "adam" else 0.0)
  )
  base = 90.0 - 10.0 * (rates - peak) ** 2
  return base[:, None] + 0.1 * np.arange(seeds)[None, :] + 0.01 * steps


@pytest.fixture
def fake_training(lr_sweep, monkeypatch):
  """``run_cell`` replaced by :func:`fake_values`; returns the calls made."""
  calls = []

  def run_cell(task, cell, seeds, steps):
    calls.append((cell.key, steps))
    return fake_values(cell, seeds, steps)

  monkeypatch.setattr(lr_sweep, "run_cell", run_cell)
  return calls


def test_the_full_plan_follows_the_protocol(lr_sweep):
  cells = lr_sweep.plan()
  keys = [c.key for c in cells]
  # 53 cells of Madam, Adam and SGD, and 11 of each recipe arm.
  assert len(keys) == len(set(keys)) == 53 + 2 * 11
  # x1 step decay for every task first, then x4 step decay starting with mlp.
  arms = ("madam/p3", "adam", "sgd", "recipe/p3", "recipe_b1/p3")
  assert keys[:21] == [
    *(f"mlp/x1/step/{a}" for a in arms),
    *(f"cnn/x1/step/{a}" for a in arms),
    *(f"transformer/x1/step/{a.replace('p3', 'p2')}" for a in arms),
    *(f"gan/x1/step/{a}" for a in arms),
    "mlp/x4/step/madam/p3",
  ]
  recipes = [c for c in cells if c.optimizer in lr_sweep.RECIPES]
  assert {c.schedule for c in recipes} == {"step"}
  assert {c.p_scale for c in recipes if c.task == "transformer"} == {2.0}
  assert {c.budget for c in cells if c.task == "gan"} == {1, 4}
  assert {c.budget for c in cells if c.schedule == "cosine"} == {4}
  swept = {
    (c.task, c.budget, c.schedule)
    for c in cells
    if c.optimizer == "madam" and c.p_scale != lr_sweep.default_p_scale(c.task)
  }
  assert swept == {(t, 4, "step") for t in ("mlp", "cnn", "transformer", "gan")}
  assert {
    c.p_scale
    for c in cells
    if c.task == "transformer" and c.budget == 4 and c.schedule == "step"
  } == {1.0, 2.0, 3.0, None}


def test_step_decay_drops_the_rate_tenfold_at_a_third_and_two_thirds(lr_sweep):
  schedule = lr_sweep.learning_rate_schedule(0.3, "step", 30)
  rates = np.asarray([schedule(t) for t in range(30)])
  np.testing.assert_allclose(
    rates, [0.3] * 10 + [0.03] * 10 + [0.003] * 10, rtol=1e-6
  )
  with pytest.raises(ValueError, match="at least 3 steps"):
    lr_sweep.learning_rate_schedule(0.3, "step", 2)


def train_for(tx, params, grads, steps):
  """``params`` after ``steps`` updates of ``tx`` with fixed ``grads``."""

  def step(_, carry):
    w, state = carry
    updates, state = tx.update(grads, state, w)
    return optax.apply_updates(w, updates), state

  return jax.jit(
    lambda: jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]
  )()


def test_a_madam_cell_trains_under_its_schedule_and_p_scale(lr_sweep):
  # A constant gradient has g_n = 1 at every step, so each step multiplies a
  # positive weight by exp(-lr_t): after 9 steps of step decay from 0.5,
  # log w = -(3 * 0.5 + 3 * 0.05 + 3 * 0.005).
  # A negative gradient grows the weight by the same factor, up to the bound
  # p_scale * RMS(w0) = p_scale * 0.5.
  params = {"w": jnp.full((4,), 0.5)}
  for p_scale, grad, expected in (
    (3.0, 1.0, 0.5 * math.exp(-1.665)),
    (3.0, -1.0, 1.5),
    (1.0, -1.0, 0.5),
    (2.0, -0.1, 1.0),
  ):
    cell = lr_sweep.Cell("mlp", 1, "step", "madam", p_scale)
    tx = lr_sweep.optimizer_factory(cell, 9)(0.5, params)
    w = train_for(tx, params, {"w": jnp.full((4,), grad)}, 9)
    np.testing.assert_allclose(w["w"], expected, rtol=1e-5)


def test_a_recipe_cell_gives_the_embedding_to_adam_under_the_schedule(
  lr_sweep,
):
  # Adam with a constant gradient moves each weight by -lr_t per step: after
  # 9 steps of step decay from RECIPE_ADDITIVE_LR, by 3 * (1 + 0.1 + 0.01)
  # times it; the kernel is Madam's (0.5 per step from 0.5: log w drops by
  # 1.665), whatever Adam's rate.
  params = {"embed": jnp.full((3, 2), 0.5), "w": jnp.full((2, 2), 0.5)}
  grads = jax.tree.map(jnp.ones_like, params)
  for optimizer in ("recipe", "recipe_b1"):
    cell = lr_sweep.Cell("transformer", 1, "step", optimizer, 2.0)
    tx = lr_sweep.optimizer_factory(cell, 9)(0.5, params)
    w = train_for(tx, params, grads, 9)
    lr = lr_sweep.RECIPE_ADDITIVE_LR
    np.testing.assert_allclose(w["embed"], 0.5 - 3.33 * lr, rtol=1e-4)
    if optimizer == "recipe":
      np.testing.assert_allclose(w["w"], 0.5 * math.exp(-1.665), rtol=1e-5)
    else:  # the first moment of a constant gradient is the gradient
      np.testing.assert_allclose(w["w"], 0.5 * math.exp(-1.665), rtol=1e-4)
  assert lr_sweep._recipe_record(cell)["recipe"]["b1"] == 0.9
  assert (
    lr_sweep._recipe_record(lr_sweep.Cell("mlp", 1, "step", "adam", None)) == {}
  )


def test_merge_adds_only_new_cells_of_the_same_settings(lr_sweep, tmp_path):
  settings = {"seeds": 2}
  ours = {"settings": settings, "tasks": {"t": 1}, "cells": {"a": 1, "b": 2}}
  path = tmp_path / "other.json"
  other = {"settings": settings, "tasks": {"t": 1}, "cells": {"b": 9, "c": 3}}
  path.write_text(json.dumps(other))
  lr_sweep.merge(ours, path, lambda *_: None)
  assert ours["cells"] == {"a": 1, "b": 2, "c": 3}
  path.write_text(json.dumps({**other, "settings": {"seeds": 3}}))
  with pytest.raises(SystemExit, match="other settings"):
    lr_sweep.merge(ours, path, lambda *_: None)


def test_the_additive_rate_check_reads_both_layouts(lr_sweep):
  grid = lr_sweep._check_grid(
    {
      "madam_rates": [0.1, 0.01],
      "additive_rates": [1e-3, 3e-2],
      "values": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]],
    }
  )
  assert grid == {
    "0.1/0.001": [1, 2],
    "0.1/0.03": [3, 4],
    "0.01/0.001": [5, 6],
    "0.01/0.03": [7, 8],
  }
  assert lr_sweep._check_grid({"grid": grid}) is grid


def test_best_rate_and_spread_match_hand_computed_values(lr_sweep):
  nan = float("nan")
  up = [[nan, nan], [90, 92], [95, 97], [80, 80], [50, 52]]  # best 0.01
  down = [[nan, 1.0], [30, 40], [9, 11], [11, 13], [50, 50]]  # best 0.01
  assert lr_sweep.best_rate(up, True) == 0.01
  assert lr_sweep.best_rate(down, False) == 0.01
  assert lr_sweep.best_rate([[nan, nan]] * 5, True) is None
  assert lr_sweep.overlapping_rates(down, False) == [0.001]
  # One seed blew up at lr 1: by its huge deviation it "overlaps" the best,
  # but not on the log scale perplexities are compared on.
  blown = [
    [469.0, 43.0, 91.0],
    [27, 27, 26],
    [16, 17, 16],
    [20, 20, 20],
    [45, 40, 44],
  ]
  assert lr_sweep.overlapping_rates(blown, False) == [1.0]
  assert lr_sweep.near_best(
    blown, {"metric": "perplexity", "higher_is_better": False}
  ) == [0.01]
  cell = {
    "task": None,
    "budget": None,
    "schedule": "step",
    "steps": 1,
    "optimizer": None,
    "p_scale": None,
  }

  def record(task, budget, optimizer, values, p_scale=None):
    return {
      **cell,
      "task": task,
      "budget": budget,
      "optimizer": optimizer,
      "p_scale": p_scale,
      "values": values,
    }

  best_at = {
    rate: [[1.0 * (r == rate)] for r in lr_sweep.LEARNING_RATES]
    for rate in lr_sweep.LEARNING_RATES
  }
  cells = [
    record("a", 1, "adam", best_at[0.1]),
    record("b", 1, "adam", best_at[0.001]),
    record("c", 1, "adam", best_at[0.0001]),
    record("a", 4, "adam", best_at[0.01]),
    record("a", 16, "adam", best_at[0.01]),
    record("a", 1, "madam", best_at[0.01], 3.0),
    # Best 0.1 (1.1 ± 0.1); 0.01 (1.0 ± 0.1) overlaps it.
    record(
      "b", 1, "madam", [[0, 0], [1.0, 1.2], [0.9, 1.1], [0, 0], [0, 0]], 3.0
    ),
    record("b", 1, "madam", best_at[1.0], 1.0),  # not the main cell
    record("c", 1, "madam", [[nan]] * 5, 3.0),
  ]  # no best rate
  results = {
    "tasks": {
      t: {"metric": "accuracy", "higher_is_better": True} for t in "abc"
    },
    "cells": {str(i): c for i, c in enumerate(cells)},
  }
  s = lr_sweep.spreads(results)
  assert s["across_tasks"] == [
    {
      "optimizer": "madam",
      "budget": 1,
      "schedule": "step",
      "best": {"a": 0.01, "b": 0.1},
      "decades": 1.0,
      "common": [0.01],
    },
    {
      "optimizer": "adam",
      "budget": 1,
      "schedule": "step",
      "best": {"a": 0.1, "b": 0.001, "c": 0.0001},
      "decades": 3.0,
      "common": [],
    },
  ]
  assert s["across_budgets"] == [
    {
      "optimizer": "adam",
      "task": "a",
      "schedule": "step",
      "best": {1: 0.1, 4: 0.01, 16: 0.01},
      "decades": 1.0,
      "common": [],
    }
  ]


def test_resume_runs_only_the_missing_cells(lr_sweep, fake_training, tmp_path):
  base = [
    "--tasks",
    "mlp",
    "--optimizers",
    "madam,adam",
    "--schedules",
    "step",
    "--p-scales",
    "3",
    "--out",
    str(tmp_path),
  ]
  first = lr_sweep.main(base + ["--budgets", "1,2"], **QUIET)
  assert fake_training == [
    ("mlp/x1/step/madam/p3", 10),
    ("mlp/x1/step/adam", 10),
    ("mlp/x2/step/madam/p3", 20),
    ("mlp/x2/step/adam", 20),
  ]
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  assert list(saved["cells"]) == [k for k, _ in fake_training]
  fake_training.clear()
  second = lr_sweep.main(base + ["--budgets", "1,2,4", "--resume"], **QUIET)
  assert fake_training == [
    ("mlp/x4/step/madam/p3", 40),
    ("mlp/x4/step/adam", 40),
  ]
  for key, record in first["cells"].items():
    assert second["cells"][key] == record  # kept, machine record too
  record = second["cells"]["mlp/x4/step/adam"]
  assert record["machine"]["command"] == (
    "python benchmarks/lr_sweep.py --tasks mlp --optimizers madam,adam "
    "--schedules step --p-scales 3 --budgets 1,2,4 --resume"
  )
  np.testing.assert_array_equal(
    record["values"],
    fake_values(lr_sweep.Cell("mlp", 4, "step", "adam", None), 2, 40),
  )
  fake_training.clear()
  lr_sweep.main(base + ["--budgets", "1,2,4", "--resume"], **QUIET)
  assert not fake_training
  with pytest.raises(SystemExit, match="other settings"):
    lr_sweep.main(
      base + ["--resume", "--seeds", "3", "--budgets", "8"], **QUIET
    )


def test_a_stopped_run_keeps_only_finished_cells(
  lr_sweep, monkeypatch, tmp_path
):
  def run_cell(task, cell, seeds, steps):
    if cell.budget == 2:
      raise KeyboardInterrupt  # stopped while training the second cell
    return fake_values(cell, seeds, steps)

  monkeypatch.setattr(lr_sweep, "run_cell", run_cell)
  with pytest.raises(KeyboardInterrupt):
    lr_sweep.main(
      [
        "--tasks",
        "mlp",
        "--optimizers",
        "sgd",
        "--budgets",
        "1,2",
        "--out",
        str(tmp_path),
      ],
      **QUIET,
    )
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  assert list(saved["cells"]) == ["mlp/x1/step/sgd"]
  assert not (tmp_path / "lr_sweep.json.tmp").exists()


def test_report_states_the_spread_and_replot_is_identical(
  lr_sweep, fake_training, tmp_path
):
  lr_sweep.main(
    [
      "--tasks",
      "mlp,cnn",
      "--budgets",
      "1,4",
      "--p-scales",
      "1,3",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  files = ("lr_sweep.json", "lr_sweep.md", "lr_sweep.png", "lr_sweep_best.png")
  written = {f: (tmp_path / f).read_bytes() for f in files}
  table = written["lr_sweep.md"].decode()
  # fake_values: Madam and SGD best at 0.1 (x1) and 0.0316 -> 0.01 (x4);
  # Adam half a decade lower. Same rate on both tasks: spread 0.
  assert (
    "| Madam | **0** (mlp 0.1, cnn 0.1; within noise everywhere: 0.1)"
    " | **0** (mlp 0.01, cnn 0.01; within noise everywhere: 0.01) |" in table
  )
  assert (
    "| Adam | mlp | step | x1 (10): 0.01, x4 (40): 0.001 | **1** | "
    "none |" in table
  )
  assert "| mlp | x4 | step | 0.01: " in table  # the p_scale table
  assert "`gan/x1/step/madam/p3`" in table  # not measured yet
  for f in files[1:]:
    (tmp_path / f).unlink()
  lr_sweep.main(["--replot", "--out", str(tmp_path)], **QUIET)
  assert {f: (tmp_path / f).read_bytes() for f in files} == written


def test_unknown_optimizer_or_schedule_is_refused(lr_sweep):
  for argv in (
    ["--optimizers", "madam,rmsprop"],
    ["--schedules", "linear"],
    ["--budgets", "0"],
  ):
    with pytest.raises(SystemExit):
      lr_sweep.parse_args(argv)


@pytest.mark.slow
def test_quick_study_trains_each_budget_and_writes_the_report(
  lr_sweep, harness, tmp_path
):
  # The recipe arm with the first moment: it runs Madam (b1 = 0.9) on the
  # kernels and Adam on the biases, so one real run covers both optimizers
  # and the recipe's record and report row (the plain arms are the same loop
  # with another optimizer_factory, tested above).
  results = lr_sweep.main(
    [
      "--quick",
      "--tasks",
      "mlp",
      "--optimizers",
      "recipe_b1",
      "--budgets",
      "1,2",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  assert list(saved["cells"]) == [
    "mlp/x1/step/recipe_b1/p3",
    "mlp/x2/step/recipe_b1/p3",
  ]
  short, long = (
    np.asarray(saved["cells"][k]["values"]) for k in saved["cells"]
  )
  assert short.shape == long.shape == (len(lr_sweep.LEARNING_RATES), 2)
  assert np.all(np.isfinite(short)) and np.all(np.isfinite(long))
  assert [saved["cells"][k]["steps"] for k in saved["cells"]] == [10, 20]
  assert not np.array_equal(short, long)
  assert saved == json.loads(json.dumps(results))
  for record in saved["cells"].values():
    assert tuple(record["machine"]) == harness.MACHINE_KEYS
    assert record["recipe"]["b1"] == 0.9
    assert record["recipe"]["additive"] == (
      f"optax.adam({lr_sweep.RECIPE_ADDITIVE_LR:g}), same schedule"
    )
  assert saved["machine"]["command"] == (
    "python benchmarks/lr_sweep.py --quick --tasks mlp --optimizers "
    "recipe_b1 --budgets 1,2"
  )
  table = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam recipe, b1 0.9, p_scale 3 |" in table and "lr=0.01" in table
  for figure in ("lr_sweep.png", "lr_sweep_best.png"):
    assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------
# The budget axis, the schedules, the p_scale arm, resuming and --replot.


def test_budgets_multiply_the_base_steps_and_the_gan_stops_at_x4(
  lr_sweep, fake_training, tmp_path
):
  results = lr_sweep.main(
    [
      "--tasks",
      "gan,mlp",
      "--optimizers",
      "sgd",
      "--budgets",
      "1,4,16",
      "--schedules",
      "step",
      "--steps",
      "7",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  assert fake_training == [
    ("gan/x1/step/sgd", 7),
    ("mlp/x1/step/sgd", 7),
    ("gan/x4/step/sgd", 28),
    ("mlp/x4/step/sgd", 28),
    ("mlp/x16/step/sgd", 112),
  ]
  assert {k: r["steps"] for k, r in results["cells"].items()} == dict(
    fake_training
  )
  assert results["tasks"]["mlp"]["base_steps"] == 7
  report = (tmp_path / "lr_sweep.md").read_text()
  assert "| SGD | mlp | step | x1 (7): " in report
  assert "x4 (28): " in report and "x16 (112): " in report


def test_cosine_and_p_scale_arms_run_only_at_their_budgets(lr_sweep):
  cells = lr_sweep.plan(
    ["mlp", "transformer"],
    [1, 4, 16],
    ["step", "cosine"],
    ["madam", "adam"],
    [1, 2, 3],
    cosine_budgets=[16],
    p_scale_budgets=[1],
  )
  keys = [c.key for c in cells]
  assert [k for k in keys if "cosine" in k] == [
    "mlp/x16/cosine/madam/p3",
    "mlp/x16/cosine/adam",
    "transformer/x16/cosine/madam/p2",
    "transformer/x16/cosine/adam",
  ]
  # The other p_scales at x1 only, step decay only; the task's own once.
  assert [k for k in keys if "madam" in k and "/x1/" in k] == [
    "mlp/x1/step/madam/p3",
    "mlp/x1/step/madam/p1",
    "mlp/x1/step/madam/p2",
    "transformer/x1/step/madam/p2",
    "transformer/x1/step/madam/p1",
    "transformer/x1/step/madam/p3",
  ]
  assert "mlp/x4/step/madam/p1" not in keys
  assert len(keys) == len(set(keys))


def test_cosine_and_constant_schedules(lr_sweep):
  cosine = lr_sweep.learning_rate_schedule(0.2, "cosine", 10)
  rates = [float(cosine(t)) for t in range(11)]
  expected = [0.1 * (1 + math.cos(math.pi * t / 10)) for t in range(11)]
  np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-7)
  assert lr_sweep.learning_rate_schedule(0.2, "constant", 10) == 0.2


def test_adam_and_sgd_cells_train_under_the_cells_schedule(lr_sweep):
  # A constant gradient of 1: Adam moves each weight by -lr_t (up to its
  # epsilon); SGD with momentum 0.9 by -lr_t * (1 - 0.9**t) / 0.1 at step t.
  params = {"w": jnp.full((3,), 5.0)}
  grads = {"w": jnp.ones((3,))}
  steps = 9
  for schedule in ("step", "cosine", "constant"):
    lr = lr_sweep.learning_rate_schedule(0.5, schedule, steps)
    rates = [float(lr(t)) if callable(lr) else lr for t in range(steps)]
    adam = lr_sweep.Cell("mlp", 1, schedule, "adam", None)
    sgd = lr_sweep.Cell("mlp", 1, schedule, "sgd", None)
    w = train_for(
      lr_sweep.optimizer_factory(adam, steps)(0.5, params), params, grads, steps
    )
    # Adam's float32 bias correction (1 - 0.999**t) is good to about 1e-5.
    np.testing.assert_allclose(5.0 - w["w"], sum(rates), rtol=2e-5)
    w = train_for(
      lr_sweep.optimizer_factory(sgd, steps)(0.5, params), params, grads, steps
    )
    moved = sum(r * (1 - 0.9 ** (t + 1)) / 0.1 for t, r in enumerate(rates))
    np.testing.assert_allclose(5.0 - w["w"], moved, rtol=1e-5)
  # The step decay really is applied: 0.5 for 3 steps, 0.05, then 0.005.
  np.testing.assert_allclose(
    [float(lr_sweep.learning_rate_schedule(0.5, "step", 9)(t)) for t in (2, 3)],
    [0.5, 0.05],
    rtol=1e-6,
  )


def test_p_scale_arm_is_reported_beside_the_tasks_own_and_kept_out_of_spreads(
  lr_sweep, monkeypatch, tmp_path
):
  # p_scale 1 has its best at 1, p_scale 3 (the MLP's own) at 0.01.
  def run_cell(task, cell, seeds, steps):
    best = {1.0: 1.0, 3.0: 0.01}.get(cell.p_scale, 0.001)
    row = [
      [80.0 + 10.0 * (lr == best)] * seeds for lr in lr_sweep.LEARNING_RATES
    ]
    return np.asarray(row)

  monkeypatch.setattr(lr_sweep, "run_cell", run_cell)
  results = lr_sweep.main(
    [
      "--tasks",
      "mlp,cnn",
      "--optimizers",
      "madam",
      "--budgets",
      "4",
      "--schedules",
      "step",
      "--p-scales",
      "1,3",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  assert sorted(results["cells"]) == [
    "cnn/x4/step/madam/p1",
    "cnn/x4/step/madam/p3",
    "mlp/x4/step/madam/p1",
    "mlp/x4/step/madam/p3",
  ]
  assert results["cells"]["mlp/x4/step/madam/p1"]["p_scale"] == 1.0
  (spread,) = lr_sweep.spreads(results)["across_tasks"]
  assert spread["best"] == {"mlp": 0.01, "cnn": 0.01}
  assert spread["decades"] == 0.0
  report = (tmp_path / "lr_sweep.md").read_text()
  assert "| task | budget | schedule | p_scale 1 | p_scale 3 |" in report
  assert "| mlp | x4 | step | 1: 90 ± 0 | 0.01: 90 ± 0 |" in report


def test_resume_keeps_the_saved_values_even_if_a_rerun_would_differ(
  lr_sweep, monkeypatch, tmp_path
):
  argv = ["--tasks", "cnn", "--optimizers", "adam", "--budgets", "1,4"]
  argv += ["--schedules", "step", "--out", str(tmp_path)]
  calls = []

  def first_run(task, cell, seeds, steps):
    calls.append(cell.key)
    return np.full((len(lr_sweep.LEARNING_RATES), seeds), float(cell.budget))

  monkeypatch.setattr(lr_sweep, "run_cell", first_run)
  lr_sweep.main(argv[:5] + ["1"] + argv[6:], **QUIET)
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  assert calls == ["cnn/x1/step/adam"]

  def second_run(task, cell, seeds, steps):
    calls.append(cell.key)
    return np.full((len(lr_sweep.LEARNING_RATES), seeds), -1.0)

  monkeypatch.setattr(lr_sweep, "run_cell", second_run)
  resumed = lr_sweep.main(argv + ["--resume"], **QUIET)
  assert calls == ["cnn/x1/step/adam", "cnn/x4/step/adam"]
  assert (
    resumed["cells"]["cnn/x1/step/adam"] == saved["cells"]["cnn/x1/step/adam"]
  )
  assert np.all(np.asarray(resumed["cells"]["cnn/x1/step/adam"]["values"]) == 1)
  assert np.all(
    np.asarray(resumed["cells"]["cnn/x4/step/adam"]["values"]) == -1
  )
  # Without --resume the saved cells are measured again.
  lr_sweep.main(argv, **QUIET)
  assert calls[2:] == ["cnn/x1/step/adam", "cnn/x4/step/adam"]


def spread_table(lr_sweep, best):
  """Results whose main cells have their best rate at ``best[(task, b)]``."""
  cells = {}
  for (task, budget), rate in best.items():
    values = [
      [1.0 + (lr == rate), 1.0 + (lr == rate)] for lr in lr_sweep.LEARNING_RATES
    ]
    cell = lr_sweep.Cell(task, budget, "step", "madam", 3.0)
    cells[cell.key] = {
      **cell._asdict(),
      "steps": 10 * budget,
      "values": values,
      "seconds": 0.0,
      "machine": {},
    }
  tasks = {t: {"metric": "accuracy", "higher_is_better": True} for t, _ in best}
  return {"tasks": tasks, "cells": cells}


def test_spread_in_decades_of_a_hand_made_table(lr_sweep):
  # x1: 1 (a) and 0.001 (b): 3 decades; x4: 0.01 on both: 0.
  # Across budgets: a goes 1 -> 0.01 -> 0.0001 (4 decades), b 0.001 -> 0.01
  # (1 decade).
  results = spread_table(
    lr_sweep,
    {
      ("a", 1): 1.0,
      ("b", 1): 0.001,
      ("a", 4): 0.01,
      ("b", 4): 0.01,
      ("a", 16): 0.0001,
    },
  )
  s = lr_sweep.spreads(results)
  assert [
    (x["budget"], x["decades"], x["best"]) for x in s["across_tasks"]
  ] == [
    (1, 3.0, {"a": 1.0, "b": 0.001}),
    (4, 0.0, {"a": 0.01, "b": 0.01}),
  ]
  assert [(x["task"], x["decades"]) for x in s["across_budgets"]] == [
    ("a", 4.0),
    ("b", 1.0),
  ]
  assert [x["common"] for x in s["across_tasks"]] == [[], [0.01]]
  assert lr_sweep.spread_decades([0.3, 0.003]) == 2.0
  assert lr_sweep.spread_decades([0.05]) == 0.0
  assert lr_sweep.spread_decades([0.02, 0.01, 0.2]) == 1.30103  # log10(20)
  assert lr_sweep.spread_decades([1.0, 0.001]) == 3.0


def test_replot_reads_the_json_not_a_copy(lr_sweep, fake_training, tmp_path):
  lr_sweep.main(
    [
      "--tasks",
      "mlp,cnn",
      "--optimizers",
      "madam",
      "--budgets",
      "1",
      "--schedules",
      "step",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  path = tmp_path / "lr_sweep.json"
  saved = json.loads(path.read_text())
  before = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam | **0** (mlp 0.1, cnn 0.1;" in before
  # Move the CNN's best to 0.0001 and drop the MLP cell's code version.
  cnn = saved["cells"]["cnn/x1/step/madam/p3"]
  cnn["values"] = [[float(lr == 0.0001)] * 2 for lr in lr_sweep.LEARNING_RATES]
  del saved["cells"]["mlp/x1/step/madam/p3"]["code"]
  path.write_text(json.dumps(saved))
  for f in ("lr_sweep.md", "lr_sweep.png", "lr_sweep_best.png"):
    (tmp_path / f).unlink()
  lr_sweep.main(["--replot", "--out", str(tmp_path)], **QUIET)
  after = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam | **3** (mlp 0.1, cnn 0.0001;" in after
  assert "| `mlp/x1/step/madam/p3` | 10 | 0 |" in after
  (row,) = [r for r in after.splitlines() if "`mlp/x1/step/madam/p3` | 10" in r]
  assert "| not recorded |" in row
  (row,) = [r for r in after.splitlines() if "`cnn/x1/step/madam/p3` | 10" in r]
  assert f"| {cnn['code']} |" in row and "not recorded" not in row
  for f in ("lr_sweep.png", "lr_sweep_best.png"):
    assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


def test_code_version_is_the_checkouts_commit_or_none(lr_sweep, monkeypatch):
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short=12", "HEAD"],
      cwd=pathlib.Path(lr_sweep.__file__).resolve().parent,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  version = lr_sweep.code_version()
  assert version in (head, head + "+modified")

  def no_git(*args, **kwargs):
    raise OSError("git is not installed")

  monkeypatch.setattr(lr_sweep.subprocess, "run", no_git)
  assert lr_sweep.code_version() is None
