"""``madam-demo`` end to end (quick mode), its plot, and checkpoint resume."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from madam_examples import checkpointing
from madam_examples import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_prints_table_and_writes_plot(tmp_path, capsys):
  assert demo.main(["--out", str(tmp_path), "--quick"]) == 0
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
  ):
    assert flag in out
