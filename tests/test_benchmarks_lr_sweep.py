"""Smoke test of ``benchmarks/lr_sweep.py --quick`` (the learning-rate study)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lr_sweep.py"


def _module():
  spec = importlib.util.spec_from_file_location("lr_sweep", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_quick_study_writes_json_table_and_figure(tmp_path):
  lr_sweep = _module()
  assert lr_sweep.main(["--quick", "--tasks", "mlp", "--optimizers",
                        "madam", "--out", str(tmp_path)]) == 0
  saved = json.loads((tmp_path / "lr_sweep.json").read_text())
  values = np.asarray(saved["results"]["mlp"]["madam"])
  assert values.shape == (len(lr_sweep.LEARNING_RATES), 2)   # lrs x seeds
  assert saved["machine"]["cores"] and saved["machine"]["jax"]
  summary = saved["summary"]["mlp"]
  assert summary["madam"]["best_lr"] in lr_sweep.LEARNING_RATES
  table = (tmp_path / "lr_sweep.md").read_text()
  assert "| Madam |" in table and "lr=0.01" in table and "±" in table
  assert (tmp_path / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
  (tmp_path / "lr_sweep.md").unlink()
  assert lr_sweep.main(["--replot", "--out", str(tmp_path)]) == 0
  assert (tmp_path / "lr_sweep.md").read_text() == table


def test_summary_counts_diverged_runs_as_worst():
  lr_sweep = _module()
  nan = float("nan")
  results = {"t": {
      "madam": np.array([[nan, nan], [90, 92], [95, 97], [80, 80], [50, 52]]),
      "adam": np.array([[10, 10], [20, 20], [90, 92], [96, 98], [60, 60]])}}
  tasks = {"t": {"metric": "accuracy", "higher_is_better": True}}
  s = lr_sweep.summarise(results, tasks)["t"]
  assert s["madam"]["best_lr"] == 0.01 and s["adam"]["best_lr"] == 0.001
  assert s["madam_at_0.01_vs_best_adam"]["gap"] == -1.0
  assert s["madam_at_0.01_vs_best_adam"]["met"]
