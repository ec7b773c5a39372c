"""Smoke test of ``benchmarks/lr_sweep.py --quick`` (the learning-rate study)."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def lr_sweep(benchmark):
  return benchmark("lr_sweep")


@pytest.mark.slow
def test_quick_study_writes_json_table_and_figure(lr_sweep, harness, tmp_path):
  results = lr_sweep.main(
    [
      "--quick",
      "--tasks",
      "mlp",
      "--optimizers",
      "madam",
      "--out",
      str(tmp_path),
    ],
    log=lambda *_: None,
  )
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  values = np.asarray(saved["results"]["mlp"]["madam"])
  assert values.shape == (len(lr_sweep.LEARNING_RATES), 2)  # lrs x seeds
  np.testing.assert_array_equal(values, results["results"]["mlp"]["madam"])
  assert tuple(saved["machine"]) == harness.MACHINE_KEYS
  assert saved["machine"]["command"] == (
    "python benchmarks/lr_sweep.py --quick --tasks mlp --optimizers madam"
  )
  summary = saved["summary"]["mlp"]
  assert summary["madam"]["best_lr"] in lr_sweep.LEARNING_RATES
  table = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam |" in table and "lr=0.01" in table and "±" in table
  assert "Reproduce: `nice python benchmarks/lr_sweep.py --quick" in table
  assert (tmp_path / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
  (tmp_path / "lr_sweep.md").unlink()
  lr_sweep.main(["--replot", "--out", str(tmp_path)], log=lambda *_: None)
  assert (tmp_path / "lr_sweep.md").read_text() == table


def test_unknown_optimizer_is_refused(lr_sweep):
  with pytest.raises(SystemExit):
    lr_sweep.parse_args(["--optimizers", "madam,rmsprop"])


def test_summary_counts_diverged_runs_as_worst(lr_sweep):
  nan = float("nan")
  results = {
    "t": {
      "madam": np.array([[nan, nan], [90, 92], [95, 97], [80, 80], [50, 52]]),
      "adam": np.array([[10, 10], [20, 20], [90, 92], [96, 98], [60, 60]]),
    }
  }
  tasks = {"t": {"metric": "accuracy", "higher_is_better": True}}
  s = lr_sweep.summarise(results, tasks)["t"]
  assert s["madam"]["best_lr"] == 0.01 and s["adam"]["best_lr"] == 0.001
  assert s["madam_at_0.01_vs_best_adam"]["gap"] == -1.0
  assert s["madam_at_0.01_vs_best_adam"]["met"]
