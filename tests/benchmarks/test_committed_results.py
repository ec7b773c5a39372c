"""The committed results in ``benchmarks/results/`` re-render from their JSON.

Each script's ``--replot`` reads its saved JSON (written before the machine
record had one set of keys, too) and writes the Markdown again; the tables
must come out as committed, so the scripts' reports still match their data.
"""

import shutil

import pytest

# Results file stem -> the script that wrote it.
SCRIPTS = {
  "checkpoint_bytes": "checkpoint_bytes",
  "example_accuracy": "example_accuracy",
  "factored_accuracy": "factored_accuracy",
  "lns_bits": "lns_bits",
  "lns_first_moment_memory": "lns_first_moment",
  "lns_first_moment_training": "lns_first_moment",
  "lns_memory": "lns_memory",
  "lns_recipe": "lns_recipe",
  "lr_sweep": "lr_sweep",
  "multiprocess_cpu": "multiprocess",
  "scaling_cpu": "scaling",
  "step_memory": "step_memory",
  "step_memory_24": "step_memory",
  "step_memory_budget": "step_memory",
  "step_memory_training": "step_memory",
  "step_time_b1_cpu": "step_time",
  "step_time_cpu": "step_time",
  "step_time_floor_cpu": "step_time",
  "step_time_grad_cpu": "step_time",
  "step_time_grad_cpu_before": "step_time",
  "step_time_levers_cpu": "step_time",
}


def _table_lines(text):
  return [line for line in text.splitlines() if line.startswith("|")]


def test_every_committed_result_is_listed(harness):
  stems = {p.stem for p in harness.RESULTS_DIR.glob("*.json")}
  assert stems == set(SCRIPTS)


@pytest.mark.parametrize("stem", sorted(SCRIPTS))
def test_replot_renders_the_committed_tables(
  benchmark, harness, stem, tmp_path
):
  script = benchmark(SCRIPTS[stem])
  shutil.copy(harness.RESULTS_DIR / f"{stem}.json", tmp_path)
  results = script.main(
    ["--replot", "--out", str(tmp_path), "--name", stem], log=lambda *_: None
  )
  assert tuple(results["machine"]) == harness.MACHINE_KEYS
  committed = (harness.RESULTS_DIR / f"{stem}.md").read_text()
  rendered = (tmp_path / f"{stem}.md").read_text()
  assert rendered.startswith(committed.splitlines()[0] + "\n\n- command: ")
  assert _table_lines(committed) and (
    _table_lines(rendered) == _table_lines(committed)
  )
  if script.REPORT.figure is not None:
    assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
