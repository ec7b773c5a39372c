"""``benchmarks/multiprocess.py``: its options, the command of each layout,
and the driver's results and table (the layouts' runs replaced by a fixed
metrics record: ``tests/examples/test_multiprocess.py`` runs the real
multi-process training)."""

import argparse
import json

import pytest


@pytest.fixture(scope="module")
def bench(benchmark):
  return benchmark("multiprocess")


def _metrics(processes, devices):
  """What ``sharded_train --metrics-out`` writes, as far as the table reads."""
  n = processes * devices
  return {
    "processes": processes,
    "local_devices": devices,
    "devices": n,
    "mesh": {"data": 1, "fsdp": n},
    "parameters": 19328,
    "param_bytes_per_device": 77312 // n,
    "opt_state_bytes_per_device": 78000 // n + 100,
    "step_time_ms": {
      "median": 10.0 * n,
      "q1": 9.0 * n,
      "q3": 11.0 * n,
      "first": 50.0,
    },
    "collectives": {
      "train_step": [] if n == 1 else ["all-gather", "all-reduce"],
      "optimizer_update": [],
    },
    "final_valid_loss": 4.304315,
    "skipped_steps": 0,
  }


def test_layouts_and_arguments(bench, tmp_path):
  assert bench.parse_layouts("1x4,2x2") == [(1, 4), (2, 2)]
  with pytest.raises(argparse.ArgumentTypeError, match="PROCESSESxDEVICES"):
    bench.parse_layouts("2by2")
  with pytest.raises(argparse.ArgumentTypeError):
    bench.parse_layouts("0x4")
  args = bench.train_arguments(2, bench.QUICK, tmp_path / "m.json")
  assert args[:4] == ["--mesh", "fsdp=-1", "--simulate-devices", "2"]
  assert "--check-collectives" in args
  assert args[args.index("--metrics-out") + 1] == str(tmp_path / "m.json")
  assert args[args.index("--dim") + 1] == str(bench.QUICK["dim"])
  assert bench.parse_args([]).layouts == list(bench.LAYOUTS)


def test_driver_writes_and_replots(bench, harness, monkeypatch, tmp_path):
  calls = []

  def fake_run(processes, devices, sizes):
    calls.append((processes, devices))
    assert sizes == bench.QUICK
    return _metrics(processes, devices)

  monkeypatch.setattr(bench, "run_layout", fake_run)
  bench.main(
    ["--quick", "--layouts", "1x1,2x2", "--out", str(tmp_path)],
    log=lambda *_: None,
  )
  assert calls == [(1, 1), (2, 2)]
  saved = json.loads((tmp_path / "multiprocess_cpu.json").read_text())
  record = saved["machine"]
  assert tuple(record) == harness.MACHINE_KEYS
  assert record["command"] == (
    "python benchmarks/multiprocess.py --quick --layouts 1x1,2x2"
  )
  assert record["devices"] == "up to 4 x cpu (simulated), in up to 2 processes"
  assert [r["processes"] for r in saved["rows"]] == [1, 2]
  table = (tmp_path / "multiprocess_cpu.md").read_text()
  assert (
    "| 2 x 2 | 18.9 | 19.1 | 0.250 | 40.0 (36.0-44.0) | all-gather, "
    "all-reduce | none | 4.304315 |"
  ) in table
  assert "| 1 x 1 | 75.5 | 76.3 | 1.000 | 10.0 (9.0-11.0) | none | none |" in (
    table
  )
  (tmp_path / "multiprocess_cpu.md").unlink()
  bench.main(["--replot", "--out", str(tmp_path)], log=lambda *_: None)
  assert (tmp_path / "multiprocess_cpu.md").read_text() == table
