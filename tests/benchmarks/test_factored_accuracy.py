"""benchmarks/factored_accuracy.py: quick mode and its arithmetic."""

import json

import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def factored_accuracy(benchmark):
  return benchmark("factored_accuracy")


def test_quick_run_writes_json_and_tables(factored_accuracy, harness, tmp_path):
  results = factored_accuracy.main(
    ["--quick", "--models", "digits MLP", "--out", str(tmp_path)],
    log=lambda *_: None,
  )
  data = json.loads((tmp_path / "factored_accuracy.json").read_text())
  assert tuple(data["machine"]) == harness.MACHINE_KEYS
  assert data["results"] == json.loads(json.dumps(results["results"]))
  mlp = data["results"]["digits MLP"]
  assert mlp["steps"] == 20 and mlp["factored_share"] == 1.0
  assert list(mlp["configs"]) == [
    "madam",
    "madam factored",
    "lns int8 factored",
  ]
  for row in mlp["configs"].values():
    assert len(row["values"]) == 1 and 0 < row["mean"] <= 100
  # The factored runs are not the full one under another name.
  values = [row["values"][0] for row in mlp["configs"].values()]
  assert values[1] != values[0]
  md = (tmp_path / "factored_accuracy.md").read_text()
  assert "| lns int8 factored |" in md and "## digits MLP (accuracy, 20" in md


def test_cost_is_the_paired_difference(factored_accuracy):
  summary = factored_accuracy.summarise(
    "digits MLP",
    {
      "madam": [98.0, 97.0],
      "madam factored": [97.0, 97.0],
      "lns int8 factored": [98.5, 96.0],
    },
  )
  rows = summary["configs"]
  assert rows["madam factored"]["gap"] == 0.5  # points lost
  assert rows["madam factored"]["within_goal"]
  assert rows["lns int8 factored"]["gap_per_seed"] == [-0.5, 1.0]
  assert rows["lns int8 factored"]["gap"] == 0.25
  assert rows["lns int8 factored"]["within_goal"]
  perplexity = factored_accuracy.summarise(
    "Transformer",
    {"madam": [20.0], "madam factored": [20.5], "lns int8 factored": [20.7]},
  )["configs"]
  assert perplexity["madam factored"]["gap"] == pytest.approx(0.025)
  assert perplexity["madam factored"]["within_goal"]
  assert not perplexity["lns int8 factored"]["within_goal"]  # +3.5%
