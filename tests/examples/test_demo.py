"""``madam-demo`` end to end (quick mode): the learning-rate sweep (the
default), the per-optimizer comparison (``--compare``), its plot, checkpoint
resume, and ``--out`` proven writable before training."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from madam_examples import checkpointing
from madam_examples import demo
from madam_examples import optimizers
from madam_examples import sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_sweep_shows_every_rate_default_and_spread(tmp_path, capsys):
  """No flags but --quick: the sweep over nine rates, three optimizers,
  two seeds here; the table marks each default, the JSON holds every run."""
  out = tmp_path / "out"
  assert demo.main(["--out", str(out), "--quick", "--seeds", "2"]) == 0
  text = capsys.readouterr().out
  assert "held-out accuracy (%)" in text and "final training loss" in text
  for label in demo.LABELS.values():
    assert label in text
    # Each row of both tables: the label, then nine separate numbers.
    rows = [
      line[len(label) :]
      for line in text.splitlines()
      if line.startswith(label) and "trained" not in line and "*" not in line
    ]
    assert len(rows) == 2, rows
    for row in rows:
      assert len([float(x) for x in row.split()]) == 9, row
  assert "spread" in text and "within 1 point" in text
  assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
  saved = json.loads((out / "sweep.json").read_text())
  assert saved["command"] == f"madam-demo --out {out} --quick --seeds 2"
  assert saved["steps"] == 20 and saved["seeds"] == [0, 1]
  rates = saved["learning_rates"]
  assert len(rates) == 9 and min(rates) == 1e-4 and max(rates) == 1.0
  assert set(saved["results"]) == {"madam", "adam", "sgd"}
  for opt, r in saved["results"].items():
    assert r["default_rate"] == optimizers.DEFAULT_LEARNING_RATES[opt]
    acc = np.asarray(r["accuracy"])
    assert acc.shape == (9, 2) and ((0 <= acc) & (acc <= 100)).all()
    mean = acc.mean(axis=1)
    assert r["best_accuracy"] == pytest.approx(mean.max())
    good = [x for x, a in zip(rates, mean) if a >= mean.max() - 1.0]
    assert r["good_rates"] == pytest.approx(good)
    assert r["good_spread_decades"] == pytest.approx(
      np.log10(max(good) / min(good))
    )
  # The default rate of each is starred in the printed grid.
  assert text.count("*") >= 3


def test_good_rates_and_their_spread():
  rates = [1e-3, 1e-2, 1e-1, 1.0]
  assert sweep.good_rates(rates, [97.2, 98.0, 97.0, 10.0], 1.0) == [
    1e-3,
    1e-2,
    1e-1,
  ]
  assert sweep.spread_decades([1e-3, 1e-1]) == pytest.approx(2.0)
  assert sweep.spread_decades([0.01]) == 0.0
  s = sweep.summarise(
    rates,
    np.array([[97.0, 97.4], [98.0, 98.0], [90.0, 90.0], [10.0, 10.0]]),
    1e-2,
    1.0,
  )
  assert s["best_rate"] == 1e-2 and s["good_rates"] == [1e-3, 1e-2]
  assert s["default_is_good"] and s["accuracy_at_default"] == 98.0


@pytest.mark.parametrize("flags", [[], ["--compare"]])
def test_out_is_proven_writable_before_training(flags, tmp_path, capsys):
  """``os.access`` says yes to root: the folder is made and a file opened in
  it before the first step; a failure is one line, exit status 2."""
  blocker = tmp_path / "blocker"
  blocker.write_text("")
  out = tmp_path / "out"
  out.mkdir()
  # A folder where an output file should go: opening it for append fails.
  name = "sweep.json" if not flags else "mlp.json"
  (out / name).mkdir()
  with pytest.raises(SystemExit) as exit_info:
    demo.main([*flags, "--out", str(out), "--quick"])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.err.startswith(
    f"madam-demo: error: argument --out: cannot write to {str(out)!r}"
  )
  assert len(captured.err.splitlines()) == 1
  assert "trained in" not in captured.out and "step" not in captured.out


def test_compare_flags_imply_compare():
  assert not demo.parse_args([]).compare
  assert demo.parse_args(["--compare"]).task == "mlp"
  assert demo.parse_args(["--task", "cnn"]).compare
  assert demo.parse_args(["--lr", "0.1"]).compare
  assert not demo.parse_args(["--seeds", "2", "--steps", "5"]).compare


def test_quick_demo_prints_table_and_writes_plot(tmp_path, capsys):
  assert demo.main(["--compare", "--out", str(tmp_path), "--quick"]) == 0
  text = capsys.readouterr().out
  assert "madam" in text and "adam" in text and "final accuracy" in text
  assert "compile (s)" in text and "train (s)" in text
  assert (tmp_path / "mlp.png").read_bytes()[:8] == PNG_MAGIC
  saved = json.loads((tmp_path / "mlp.json").read_text())
  assert [r["optimizer"] for r in saved["results"]] == ["madam", "adam"]
  assert [r["lr"] for r in saved["results"]] == [0.01, 0.001]
  for r in saved["results"]:
    assert 0 <= r["final"] <= 100 and r["resumed_from"] == 0
    # Compilation is timed apart from the steady-state steps.
    assert r["compile_seconds"] > 0 and r["train_seconds"] > 0
  assert set(saved["history"]["madam lr=0.01"]) >= {"step", "accuracy"}
  assert "compile_seconds" not in saved["history"]["madam lr=0.01"]


@pytest.mark.slow
def test_demo_resumes_bit_for_bit_from_the_latest_checkpoint(tmp_path, capsys):
  """``madam-demo --checkpoint-dir``: a run cut short after its step-10
  checkpoint (the step-20 one removed) resumes from step 10, says so, and
  ends with exactly the numbers of the uninterrupted run."""
  ckpt = tmp_path / "ckpt"
  args = [
    "--optimizer",
    "madam",
    "--steps",
    "20",
    "--checkpoint-every",
    "10",
    "--checkpoint-dir",
    str(ckpt),
  ]
  assert demo.main(args + ["--out", str(tmp_path / "a")]) == 0
  assert "no checkpoint in" in capsys.readouterr().out
  run = ckpt / demo.run_name("mlp", "madam", 0.01, 0)
  assert checkpointing.all_steps(run) == [10, 20]
  # A run cut off after step 10: only the step-10 checkpoint is complete.
  shutil.rmtree(run / "20")
  assert checkpointing.latest_step(run) == 10
  assert demo.main(args + ["--out", str(tmp_path / "b")]) == 0
  out = capsys.readouterr().out
  assert re.search(
    r"resumed from checkpoint step 10 of 20 in \S*" + re.escape(run.name), out
  ), out
  a = json.loads((tmp_path / "a" / "mlp.json").read_text())
  b = json.loads((tmp_path / "b" / "mlp.json").read_text())
  assert b["results"][0]["resumed_from"] == 10
  assert b["history"] == a["history"]  # exact, every metric
  for key in ("final", "best", "train_loss"):
    assert b["results"][0][key] == a["results"][0][key], key
  assert checkpointing.all_steps(run) == [10, 20]
  # Resuming the same run folder with another length (hence another cosine
  # schedule) is refused, naming the setting, rather than silently mixed.
  longer = ["30" if x == "20" else x for x in args]
  with pytest.raises(ValueError, match="steps"):
    demo.main(longer + ["--out", str(tmp_path / "c")])


def test_console_script_help_lists_the_options():
  out = subprocess.run(
    [sys.executable, "-m", "madam_examples.demo", "--help"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  for flag in (
    "--task",
    "--optimizer",
    "--lr",
    "--steps",
    "--seed",
    "--out",
    "--data",
    "--quick",
    "--checkpoint-dir",
    "--checkpoint-every",
    "--compare",
    "--seeds",
  ):
    assert flag in out


def test_resume_between_evaluations_reports_the_uninterrupted_loss(tmp_path):
  """Checkpoints every 6 steps, evaluations every 10: a run resumed from
  step 12 reports at step 20 the mean training loss of steps 11 to 20, as
  the uninterrupted run does (the running sum is in the checkpoint), not
  the mean of steps 13 to 20."""
  ckpt = tmp_path / "ckpt"
  args = [
    "--optimizer",
    "madam",
    "--steps",
    "20",
    "--checkpoint-every",
    "6",
    "--checkpoint-dir",
    str(ckpt),
  ]
  assert demo.main(args + ["--out", str(tmp_path / "a")]) == 0
  run = ckpt / demo.run_name("mlp", "madam", 0.01, 0)
  assert checkpointing.all_steps(run) == [12, 18, 20]
  for step in ("18", "20"):  # cut off after the step-12 checkpoint
    shutil.rmtree(run / step)
  assert demo.main(args + ["--out", str(tmp_path / "b")]) == 0
  a = json.loads((tmp_path / "a" / "mlp.json").read_text())
  b = json.loads((tmp_path / "b" / "mlp.json").read_text())
  assert b["results"][0]["resumed_from"] == 12
  assert a["history"]["madam lr=0.01"]["step"] == [10, 20]
  assert b["history"] == a["history"]  # exact, every metric
  assert b["results"][0]["train_loss"] == a["results"][0]["train_loss"]
