"""benchmarks/factored_accuracy.py: quick mode, its arithmetic, its trainers."""

import json

import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def factored_accuracy(benchmark):
  return benchmark("factored_accuracy")


def test_quick_run_writes_json_and_tables(factored_accuracy, harness,
                                          tmp_path):
  results = factored_accuracy.main(
      ["--quick", "--models", "digits MLP", "--out", str(tmp_path)],
      log=lambda *_: None)
  data = json.loads((tmp_path / "factored_accuracy.json").read_text())
  assert tuple(data["machine"]) == harness.MACHINE_KEYS
  assert data["results"] == json.loads(json.dumps(results["results"]))
  mlp = data["results"]["digits MLP"]
  assert mlp["steps"] == 20 and mlp["factored_share"] == 1.0
  assert list(mlp["configs"]) == ["madam", "madam factored",
                                  "lns int8 factored"]
  for row in mlp["configs"].values():
    assert len(row["values"]) == 1 and 0 < row["mean"] <= 100
  md = (tmp_path / "factored_accuracy.md").read_text()
  assert "| lns int8 factored |" in md and "## digits MLP (accuracy, 20" in md


def test_cost_is_the_paired_difference(factored_accuracy):
  summary = factored_accuracy.summarise("digits MLP", {
      "madam": [98.0, 97.0], "madam factored": [97.0, 97.0],
      "lns int8 factored": [98.5, 96.0]})
  rows = summary["configs"]
  assert rows["madam factored"]["gap"] == 0.5          # points lost
  assert rows["madam factored"]["within_goal"]
  assert rows["lns int8 factored"]["gap_per_seed"] == [-0.5, 1.0]
  assert rows["lns int8 factored"]["gap"] == 0.25
  assert rows["lns int8 factored"]["within_goal"]
  perplexity = factored_accuracy.summarise("Transformer", {
      "madam": [20.0], "madam factored": [20.5],
      "lns int8 factored": [20.7]})["configs"]
  assert perplexity["madam factored"]["gap"] == pytest.approx(0.025)
  assert perplexity["madam factored"]["within_goal"]
  assert not perplexity["lns int8 factored"]["within_goal"]   # +3.5%


@pytest.mark.slow
def test_float_runs_are_the_examples_trainer(factored_accuracy):
  """Without factoring, the benchmark's float run is ``train.train`` with
  Madam, bit for bit (the same initial weights, batches and schedule)."""
  from madam_examples import train as train_lib  # pylint: disable=import-outside-toplevel
  task = train_lib.build_task("mlp", quick=True)
  ours = factored_accuracy.train_float_madam(task, 1, 12, factored=False)
  _, history = train_lib.train(task, "madam", 0.01, seed=1, steps=12,
                               schedule="cosine")
  assert ours["accuracy"] == history["accuracy"][-1]
  assert ours["test_loss"] == history["test_loss"][-1]
  factored = factored_accuracy.train_float_madam(task, 1, 12, factored=True)
  assert factored["test_loss"] != ours["test_loss"]
  assert np.isfinite(factored["test_loss"])
