"""``benchmarks/lr_sweep.py``: the learning-rate study by budget.

The fast tests replace the training of a cell (``run_cell``) by a function
of the cell, so they check the plan, resuming, the spread of the best rates
and the report without training; the slow one trains a few steps for real.
"""

import json
import math

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
  assert len(keys) == len(set(keys)) == 53
  # x1 step decay for every task first, then x4 step decay starting with mlp.
  assert keys[:13] == [
    "mlp/x1/step/madam/p3",
    "mlp/x1/step/adam",
    "mlp/x1/step/sgd",
    "cnn/x1/step/madam/p3",
    "cnn/x1/step/adam",
    "cnn/x1/step/sgd",
    "transformer/x1/step/madam/p2",
    "transformer/x1/step/adam",
    "transformer/x1/step/sgd",
    "gan/x1/step/madam/p3",
    "gan/x1/step/adam",
    "gan/x1/step/sgd",
    "mlp/x4/step/madam/p3",
  ]
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
  results = lr_sweep.main(
    [
      "--quick",
      "--tasks",
      "mlp",
      "--optimizers",
      "madam",
      "--budgets",
      "1,2",
      "--out",
      str(tmp_path),
    ],
    **QUIET,
  )
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  assert list(saved["cells"]) == [
    "mlp/x1/step/madam/p3",
    "mlp/x2/step/madam/p3",
  ]
  short, long = (
    np.asarray(saved["cells"][k]["values"]) for k in saved["cells"]
  )
  assert short.shape == long.shape == (len(lr_sweep.LEARNING_RATES), 2)
  assert [saved["cells"][k]["steps"] for k in saved["cells"]] == [10, 20]
  assert not np.array_equal(short, long)
  assert saved == json.loads(json.dumps(results))
  for record in saved["cells"].values():
    assert tuple(record["machine"]) == harness.MACHINE_KEYS
  assert saved["machine"]["command"] == (
    "python benchmarks/lr_sweep.py --quick --tasks mlp --optimizers madam "
    "--budgets 1,2"
  )
  table = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam, p_scale 3 |" in table and "lr=0.01" in table
  for figure in ("lr_sweep.png", "lr_sweep_best.png"):
    assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
