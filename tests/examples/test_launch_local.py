"""The local launcher (``madam_examples.launch_local``): it starts N
processes with the coordinator flags, streams process 0's output, and stops
them all when one fails, when its time is up, or when it is killed itself.

The processes here are a small stand-in program (no JAX), so each test takes
a few seconds; ``tests/examples/test_multiprocess.py`` launches the real
training script.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from madam_examples import launch_local

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 60  # seconds: every launch here ends in a few

WORKER = """
import argparse, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--mode")
parser.add_argument("--coordinator-address")
parser.add_argument("--num-processes", type=int)
parser.add_argument("--process-id", type=int)
args = parser.parse_args()
print(f"process {args.process_id} of {args.num_processes} at "
      f"{args.coordinator_address}", flush=True)
if args.mode == "ok" or (args.mode == "fail" and args.process_id == 1):
  sys.exit(0 if args.mode == "ok" else 3)
time.sleep(300)
"""


@pytest.fixture
def worker_env(tmp_path):
  (tmp_path / "fake_worker.py").write_text(WORKER)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    [str(tmp_path), str(ROOT)]
    + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return env


def _launcher(n, mode, log_dir, extra=()):
  return [
    sys.executable,
    "-m",
    "madam_examples.launch_local",
    "-n",
    str(n),
    "--module",
    "fake_worker",
    "--log-dir",
    str(log_dir),
    *extra,
    "--",
    "--mode",
    mode,
  ]


def _pids(stderr):
  match = re.search(r"\(pids ([\d, ]+)\)", stderr)
  assert match, stderr
  return [int(p) for p in match[1].split(", ")]


def _gone(pid):
  """No such process, or only its zombie (dead, waiting to be reaped)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return False


def test_all_processes_succeed(tmp_path, worker_env):
  proc = subprocess.run(
    _launcher(3, "ok", tmp_path / "logs"),
    capture_output=True,
    text=True,
    env=worker_env,
    timeout=TIMEOUT,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  address = re.search(r"on (127\.0\.0\.1:\d+)", proc.stderr)[1]
  assert proc.stdout == f"process 0 of 3 at {address}\n"  # process 0's
  for i in (1, 2):
    assert (tmp_path / "logs" / f"process_{i}.log").read_text() == (
      f"process {i} of 3 at {address}\n"
    )


def test_a_failed_process_stops_the_others(tmp_path, worker_env):
  start = time.monotonic()
  proc = subprocess.run(
    _launcher(3, "fail", tmp_path / "logs"),
    capture_output=True,
    text=True,
    env=worker_env,
    timeout=TIMEOUT,
    check=False,
  )
  assert time.monotonic() - start < TIMEOUT / 2  # not the others' 300 s
  assert proc.returncode == 3
  log = tmp_path / "logs" / "process_1.log"
  assert (
    f"launch_local: process 1 of 3 ended with exit status 3; stopping "
    f"the others (its log: {log})"
  ) in proc.stderr
  assert "launch_local: last lines of process 1:\nprocess 1 of 3" in (
    proc.stderr
  )
  assert all(_gone(pid) for pid in _pids(proc.stderr))


def test_the_whole_run_is_bounded_by_timeout(tmp_path, worker_env):
  start = time.monotonic()
  proc = subprocess.run(
    _launcher(2, "sleep", tmp_path / "logs", ["--timeout", "1"]),
    capture_output=True,
    text=True,
    env=worker_env,
    timeout=TIMEOUT,
    check=False,
  )
  assert 1 <= time.monotonic() - start < TIMEOUT / 2
  assert proc.returncode == 124
  assert (
    "launch_local: the run took more than 1 s (--timeout); stopped "
    "every process"
  ) in proc.stderr
  assert all(_gone(pid) for pid in _pids(proc.stderr))


def test_killing_the_launcher_kills_its_processes(tmp_path, worker_env):
  """SIGKILL cannot be caught: the processes die with their parent
  (Linux's parent-death signal), leaving no orphan."""
  if not sys.platform.startswith("linux"):
    pytest.skip("the parent-death signal is Linux's")
  launcher = subprocess.Popen(  # pylint: disable=consider-using-with
    _launcher(2, "sleep", tmp_path / "logs"),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=worker_env,
  )
  pids = []
  try:
    pids = _pids(launcher.stderr.readline())
    launcher.kill()
    launcher.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT / 2
    while not all(_gone(pid) for pid in pids):
      assert time.monotonic() < deadline, "a process outlived its launcher"
      time.sleep(0.05)
  finally:  # whatever happened, leave nothing behind
    launcher.kill()
    launcher.wait(TIMEOUT)
    launcher.stderr.close()
    for pid in pids:
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_bad_arguments_are_clear_errors(capsys):
  with pytest.raises(SystemExit):
    launch_local.parse_args(["-n", "0", "--", "--steps", "1"])
  assert capsys.readouterr().err == (
    "python -m madam_examples.launch_local: error: argument "
    "-n/--num-processes: must be at least 1, got 0\n"
  )
  with pytest.raises(SystemExit):
    launch_local.parse_args(["-n", "2", "--timeout", "-1"])
  assert "argument --timeout: must be positive, got -1" in (
    capsys.readouterr().err
  )
  args = launch_local.parse_args(["-n", "2", "--", "--mesh", "data=4"])
  assert args.args == ["--mesh", "data=4"]
  assert args.module == "madam_examples.sharded_train"
