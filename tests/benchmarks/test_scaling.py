"""``benchmarks/scaling.py`` in-process, on 2 of the 8 simulated devices of
``tests/conftest.py`` (the script's own worker subprocesses are not started:
the driver is run with a worker that returns a row measured here)."""

import json

import pytest


@pytest.fixture(scope="module")
def scaling(benchmark):
  return benchmark("scaling")


@pytest.fixture(scope="module")
def fsdp_row(scaling, eight_devices):
  return scaling.measure(
    "fsdp", 2, dict(scaling.QUICK, steps=1), devices=eight_devices
  )


def test_fsdp_row_halves_memory(fsdp_row):
  row = fsdp_row
  assert row["mesh"] == {"data": 1, "fsdp": 2}
  assert row["param_bytes_per_device"] * 2 == row["param_bytes_total"]
  # Optimizer state: half of every tensor, plus the replicated scalars.
  half = row["opt_state_bytes_total"] / 2
  assert half <= row["opt_state_bytes_per_device"] < half + 1024
  assert row["collectives_optimizer_update"] == []
  assert row["train_step"]["q1_ms"] <= row["train_step"]["median_ms"]
  assert row["train_step"]["median_ms"] > 0


def test_driver_writes_and_replots(
  scaling, harness, fsdp_row, monkeypatch, tmp_path
):
  def fake_worker(n, platform, quick):
    assert (n, platform, quick) == (2, "cpu", True)
    return {
      "devices": {"backend": "cpu", "devices": "2 x cpu"},
      "rows": [fsdp_row],
    }

  monkeypatch.setattr(scaling, "run_worker", fake_worker)
  scaling.main(
    ["--quick", "--devices", "2", "--out", str(tmp_path)], log=lambda *_: None
  )
  saved = json.loads((tmp_path / "scaling_cpu.json").read_text())
  record = saved["machine"]
  assert tuple(record) == harness.MACHINE_KEYS
  assert (record["backend"], record["devices"]) == ("cpu", "2 x cpu")
  assert record["command"] == "python benchmarks/scaling.py --quick --devices 2"
  assert saved["rows"] == json.loads(json.dumps([fsdp_row]))
  table = (tmp_path / "scaling_cpu.md").read_text()
  assert "| 2 | fsdp |" in table and "simulated" in table
  (tmp_path / "scaling_cpu.md").unlink()
  scaling.main(["--replot", "--out", str(tmp_path)], log=lambda *_: None)
  assert (tmp_path / "scaling_cpu.md").read_text() == table


def test_worker_reports_its_devices_and_rows(scaling, monkeypatch, capsys):
  monkeypatch.setattr(
    scaling, "measure", lambda layout, n, sizes: {"layout": layout, "n": n}
  )
  scaling.main(["--worker", "2", "--quick"])
  result = scaling.worker_result(capsys.readouterr().out)
  assert result["rows"] == [
    {"layout": "fsdp", "n": 2},
    {"layout": "data", "n": 2},
  ]
  assert set(result["devices"]) == {"backend", "devices"}


def test_options(scaling):
  args = scaling.parse_args(["--platform", "gpu", "--devices", "1,2"])
  assert (args.name, args.devices) == ("scaling_gpu", "1,2")
  assert scaling.parse_args(["--name", "x"]).name == "x"
