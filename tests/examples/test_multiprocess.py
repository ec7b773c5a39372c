"""``sharded_train`` as several real JAX processes on this machine.

Every run here is a set of fresh processes started by
``madam_examples.launch_local`` (``jax.distributed`` with a coordinator on
127.0.0.1, CPU devices, collectives over Gloo): the code path of a pod,
minus the hardware. Each process gets its own environment (``conftest.py``'s
8 simulated devices are for the test process only), every launch is bounded
in time and stops all its processes when one fails or when the test ends.

The runs are tiny (a one-block Transformer of width 32, 24 steps) and
compared through their ``--metrics-out`` JSON (losses, skipped steps) and
their last checkpoint, read here whole (parameters and optimizer state: bit
for bit, or as float64 sums of absolute values per leaf across layouts).
The two uninterrupted references (2 processes x 2 devices and 1 process x 4
devices, same ``data=2,fsdp=2`` mesh) are shared by the tests of this
module.

Run as a script, this file is ``sharded_train`` with a test hook (see
:func:`main_with_hook`).
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, NamedTuple

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from madam_examples import checkpointing
from madam_examples import launch_local

ROOT = pathlib.Path(__file__).resolve().parents[2]
THIS_MODULE = "tests.examples.test_multiprocess"
TRAIN_MODULE = "madam_examples.sharded_train"
STEPS = 24
TINY = [
  "--mesh",
  "data=2,fsdp=2",
  "--steps",
  str(STEPS),
  "--batch-size",
  "8",
  "--context",
  "16",
  "--dim",
  "32",
  "--heads",
  "2",
  "--layers",
  "1",
  "--log-every",
  "8",
  "--initialization-timeout",
  "60",
]
LAUNCH_TIMEOUT = 300  # seconds per launch; about 30 on an idle 2-core CPU
RTOL = 1e-5  # between layouts: only the order of sums differs


class Run(NamedTuple):
  code: int
  out: str  # process 0's output
  metrics: dict[str, Any] | None


def _env() -> dict[str, str]:
  """The processes' environment: CPU, this checkout importable, and no
  device count inherited from the test process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return env


def _args(directory: pathlib.Path, processes: int, extra=()) -> list[str]:
  return [
    *TINY,
    "--simulate-devices",
    str(4 // processes),
    "--metrics-out",
    str(directory / "metrics.json"),
    *extra,
  ]


def _read(directory: pathlib.Path, code: int) -> Run:
  out = (directory / "process_0.log").read_text()
  path = directory / "metrics.json"
  metrics = json.loads(path.read_text()) if path.exists() else None
  return Run(code, out, metrics)


def _logs(directory: pathlib.Path) -> str:
  return "\n".join(
    f"--- {p.name}\n{p.read_text()[-3000:]}"
    for p in sorted(directory.glob("process_*.log"))
  )


def _cluster(
  directory: pathlib.Path,
  processes: int,
  extra=(),
  *,
  module: str = TRAIN_MODULE,
  hook=(),
) -> Any:
  """Starts ``processes`` processes (output in ``directory``)."""
  directory.mkdir(parents=True, exist_ok=True)
  out = open(directory / "process_0.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
  cluster = launch_local.LocalCluster(
    processes,
    [*hook, *_args(directory, processes, extra)],
    module=module,
    log_dir=str(directory),
    stdout=out,
    env=_env(),
  )
  cluster.out_file = out
  return cluster


def launch(
  directory: pathlib.Path,
  processes: int,
  extra=(),
  *,
  expect_success: bool = True,
  hook=(),
) -> Run:
  """One run of ``sharded_train``: 2 processes x 2 devices through the
  launcher, or 1 process x 4 devices as a plain command (no coordinator)."""
  directory.mkdir(parents=True, exist_ok=True)
  if processes == 1:
    with open(directory / "process_0.log", "w", encoding="utf-8") as out:
      code = subprocess.run(
        [sys.executable, "-m", TRAIN_MODULE, *_args(directory, 1, extra)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
        timeout=LAUNCH_TIMEOUT,
        check=False,
      ).returncode
  else:
    module = THIS_MODULE if hook else TRAIN_MODULE
    with _cluster(directory, processes, extra, module=module, hook=hook) as c:
      code = c.wait(LAUNCH_TIMEOUT)
    c.out_file.close()
  if expect_success:
    assert code == 0, f"status {code}\n{_logs(directory)}"
  return _read(directory, code)


def _last_checkpoint(ckpt_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """The run's last checkpoint, read whole as NumPy arrays, by leaf path."""
  item = epath.Path(ckpt_dir) / str(checkpointing.latest_step(ckpt_dir))
  handler = ocp.StandardCheckpointHandler()
  tree = handler.metadata(item / "default").tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  args = ocp.args.StandardRestore(target)
  arrays = handler.restore(item / "default", args=args)
  handler.close()
  return {
    ".".join(ocp.tree.str_keypath(path)): x
    for path, x in jax.tree_util.tree_flatten_with_path(arrays)[0]
  }


def _checksums(leaves: dict[str, np.ndarray], part: str) -> dict[str, float]:
  """Float64 sum of absolute values of each leaf of ``train_state.part``."""
  return {
    name: math.fsum(np.abs(x.astype(np.float64)).ravel())
    for name, x in leaves.items()
    if name.startswith(f"train_state.{part}.")
  }


def _assert_close(got: dict[str, float], want: dict[str, float], rtol):
  assert got.keys() == want.keys() and got
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, err_msg=name)


def _assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------- references


def _ckpt(directory: pathlib.Path) -> list[str]:
  return ["--checkpoint-dir", str(directory), "--checkpoint-every", "8"]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
  """Uninterrupted: 2 processes x 2 devices, checkpoints every 8 steps;
  only process 0 is given --metrics-out (it used to make both hang at the
  end: the metrics' collectives ran on process 0 alone)."""
  directory = tmp_path_factory.mktemp("two_by_two")
  run = launch(
    directory,
    2,
    [*_ckpt(directory / "ckpt"), "--check-collectives"],
    hook=["--metrics-out-on-process-0-only", "0"],
  )
  return run, directory, _last_checkpoint(directory / "ckpt")


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory):
  """Uninterrupted: 1 process x 4 devices, checkpoints every 8 steps."""
  directory = tmp_path_factory.mktemp("one_by_four")
  run = launch(directory, 1, _ckpt(directory / "ckpt"))
  return run, directory, _last_checkpoint(directory / "ckpt")


# ---------------------------------------------------------------- tests


def test_two_processes_match_one_process_with_four_devices(
  two_by_two, one_by_four
):
  """2 x 2 = 1 x 4: the same global batches, the same losses (1e-5
  relative), the same parameter checksums; process 0 alone logs."""
  (two, _, two_state), (one, _, one_state) = two_by_two, one_by_four
  assert two.metrics["processes"] == 2 and one.metrics["processes"] == 1
  assert two.metrics["devices"] == one.metrics["devices"] == 4
  assert two.metrics["local_devices"] == 2
  assert two.metrics["mesh"] == one.metrics["mesh"] == {"data": 2, "fsdp": 2}
  assert len(two.metrics["losses"]) == STEPS
  assert two.metrics["losses"][-1] < two.metrics["losses"][0]  # trains
  np.testing.assert_allclose(
    two.metrics["losses"], one.metrics["losses"], rtol=RTOL
  )
  np.testing.assert_allclose(
    two.metrics["final_valid_loss"], one.metrics["final_valid_loss"], rtol=RTOL
  )
  _assert_close(
    _checksums(two_state, "params"), _checksums(one_state, "params"), RTOL
  )
  assert "2 process(es), 4 cpu device(s)" in two.out
  assert two.out.count(f"step {STEPS:5d}  train loss") == 1
  # The gradient all-reduce crosses processes; the optimizer update alone
  # has no collective.
  assert "all-reduce" in two.metrics["collectives"]["train_step"]
  assert two.metrics["collectives"]["optimizer_update"] == []
  # Each device holds half of the parameters and of the optimizer state
  # (fsdp=2), up to the replicated per-tensor scalars.
  assert (
    two.metrics["param_bytes_per_device"]
    == one.metrics["param_bytes_per_device"]
  )


def test_process_killed_in_a_save_stops_the_run_and_a_relaunch_resumes_exactly(
  tmp_path, two_by_two
):
  """Process 0 is killed (SIGKILL) while finalising the save of step 16
  (its arrays written, before the commit), after the step-8 checkpoint:
  the launcher stops process 1, step 16 is no checkpoint, and the same
  command again resumes from step 8 and ends with parameters, optimizer
  state and PRNG key bit-identical to the uninterrupted run's."""
  reference, _, reference_state = two_by_two
  ckpt_dir = tmp_path / "ckpt"
  with _cluster(
    tmp_path / "killed",
    2,
    _ckpt(ckpt_dir),
    module=THIS_MODULE,
    hook=["--crash-in-save", "16"],
  ) as cluster:
    assert cluster.wait(LAUNCH_TIMEOUT) == -signal.SIGKILL, _logs(
      tmp_path / "killed"
    )
  cluster.out_file.close()
  assert cluster.failure.startswith(
    "launch_local: process 0 of 2 ended with killed by SIGKILL; stopping "
    "the others"
  )
  assert all(p.poll() is not None for p in cluster.processes)  # no orphan
  assert "killed while saving step 16" in (
    (tmp_path / "killed" / "process_0.log").read_text()
  )
  assert list(ckpt_dir.glob("16.orbax-checkpoint-tmp*")), os.listdir(ckpt_dir)
  assert checkpointing.all_steps(ckpt_dir) == [8]
  resumed = launch(tmp_path / "resumed", 2, _ckpt(ckpt_dir))
  assert f"Resumed from step 8 in {ckpt_dir}" in resumed.out
  assert resumed.metrics["resumed_from"] == 8
  assert resumed.metrics["losses"] == reference.metrics["losses"][8:]
  assert (
    resumed.metrics["final_valid_loss"] == reference.metrics["final_valid_loss"]
  )
  _assert_equal(_last_checkpoint(ckpt_dir), reference_state)


def test_nan_gradients_on_one_process_skip_the_step_on_every_process(
  tmp_path, two_by_two
):
  """NaN loss and gradients from process 1's rows at steps 5 and 11: both
  processes skip both updates (each counts 2), the weights and Madam's
  second moment stay finite, and the run ends within 2% of the clean run's
  validation loss."""
  reference, _, _ = two_by_two
  run = launch(
    tmp_path,
    2,
    _ckpt(tmp_path / "ckpt"),
    hook=["--nan-on-process-1-at", "5,11"],
  )
  metrics = run.metrics
  assert metrics["skipped_steps"] == 2
  assert metrics["skipped_steps_per_process"] == [2, 2]
  state = _last_checkpoint(tmp_path / "ckpt")
  assert _checksums(state, "opt_state")
  assert all(np.isfinite(x).all() for x in state.values())
  losses = np.asarray(metrics["losses"])
  assert np.isnan(losses[[4, 10]]).all()
  assert np.isfinite(np.delete(losses, [4, 10])).all()
  # Before the first injection the run is the clean run, exactly.
  assert metrics["losses"][:4] == reference.metrics["losses"][:4]
  assert (
    "step     5  non-finite loss or gradient: update skipped on every "
    "process (1 skipped in all)"
  ) in run.out
  assert "2 step(s) skipped in all" in run.out
  clean = reference.metrics["final_valid_loss"]
  assert abs(metrics["final_valid_loss"] - clean) < 0.02 * clean


def test_processes_with_different_settings_stop_naming_the_setting(tmp_path):
  """Process 1 started with --steps 30, process 0 with 24: both stop at
  start-up with one line naming the setting and each process's value."""
  start = time.monotonic()
  run = launch(
    tmp_path, 2, hook=["--steps-on-process-1", "30"], expect_success=False
  )
  assert run.code == 2, _logs(tmp_path)
  errors = [line for line in run.out.splitlines() if "error:" in line]
  assert errors == [
    f"python -m {TRAIN_MODULE}: error: the processes were started with "
    "different settings (steps: process 0 24, process 1 30). Start every "
    "process with the same flags (only --metrics-out may differ)."
  ], _logs(tmp_path)
  assert "Traceback" not in _logs(tmp_path)
  assert time.monotonic() - start < LAUNCH_TIMEOUT / 5


def test_barrier_timeout_names_the_missing_process(tmp_path):
  """Process 1 stalls before the first barrier: process 0 stops after the
  barrier's timeout (2 s here) naming process 1, and the launcher stops
  process 1."""
  run = launch(
    tmp_path, 2, hook=["--stall-process-1", "2"], expect_success=False
  )
  assert run.code == 1, _logs(tmp_path)
  errors = [line for line in run.out.splitlines() if "error:" in line]
  assert errors == [
    f"python -m {TRAIN_MODULE}: error: process 1 of 2 did not reach 'setup' "
    "within 2 s (this is process 0); it is stuck, was started late, or "
    "died: see its log."
  ], _logs(tmp_path)


def test_process_that_never_arrives_stops_the_other_with_one_line(tmp_path):
  """Process 0 of 2 alone: it stops after --initialization-timeout seconds
  with one line on stderr saying what to do, not JAX's stack trace."""
  address = f"127.0.0.1:{launch_local.free_port()}"
  args = [
    *TINY,
    "--simulate-devices",
    "2",
    "--initialization-timeout",
    "2",
    "--coordinator-address",
    address,
    "--num-processes",
    "2",
    "--process-id",
    "0",
  ]
  start = time.monotonic()
  proc = subprocess.run(
    [sys.executable, "-m", TRAIN_MODULE, *args],
    capture_output=True,
    text=True,
    env=_env(),
    cwd=ROOT,
    timeout=120,
    check=False,
  )
  elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert errors == [
    f"python -m {TRAIN_MODULE}: error: process 0 of 2: not every process reached the coordinator at "
    f"{address} within 2 s (--initialization-timeout). Start every process "
    "with the same --coordinator-address and --num-processes and its own "
    "--process-id (on one machine, python -m madam_examples.launch_local "
    "does it)."
  ], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr
  assert elapsed < 2 + 60  # the timeout, plus starting Python and JAX


@pytest.mark.slow
def test_resume_onto_another_layout_reshards(tmp_path, two_by_two, one_by_four):
  """A checkpoint of 2 processes resumed on 1 process with another mesh
  (fsdp=4: each tensor split 4 ways instead of 2), and one of 1 process
  resumed on 2: each ends with the checksums of the uninterrupted runs on
  either layout, to 1e-6 relative."""
  references = [two_by_two[2], one_by_four[2]]
  for (_, source, _), processes, extra in (
    (two_by_two, 1, ["--mesh", "fsdp=4"]),
    (one_by_four, 2, []),
  ):
    ckpt = tmp_path / f"from_{source.name}"
    shutil.copytree(source / "ckpt", ckpt)
    assert checkpointing.all_steps(ckpt) == [8, 16, 24]
    for step in ("16", "24"):  # as if cut off after step 8
      shutil.rmtree(ckpt / step)
    run = launch(
      tmp_path / f"on_{processes}", processes, [*_ckpt(ckpt), *extra]
    )
    assert run.metrics["resumed_from"] == 8
    assert run.metrics["processes"] == processes
    state = _last_checkpoint(ckpt)
    for reference in references:
      for part in ("params", "opt_state"):
        _assert_close(
          _checksums(state, part), _checksums(reference, part), 1e-6
        )


def test_docstring_examples():
  import doctest  # pylint: disable=import-outside-toplevel

  from madam_examples import metrics  # pylint: disable=import-outside-toplevel
  from madam_examples import processes  # pylint: disable=import-outside-toplevel

  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  results = [
    doctest.testmod(m, optionflags=flags)
    for m in (metrics, processes, launch_local)
  ]
  assert sum(r.attempted for r in results) >= 4
  assert all(r.failed == 0 for r in results)


# ---------------------------------------------------------------- test hooks


def main_with_hook(argv: list[str]) -> int:
  """``sharded_train.main`` with one test hook, given first in ``argv``.

  * ``--nan-on-process-1-at S1,S2``: NaN loss and gradients from process
    1's rows at those steps (:mod:`tests.examples.nan_injection`).
  * ``--metrics-out-on-process-0-only 0``: the other processes are started
    without ``--metrics-out`` (as the docs say it is process 0's).
  * ``--steps-on-process-1 S``: process 1 is started with ``--steps S``.
  * ``--stall-process-1 T``: barriers time out after ``T`` s, and process 1
    stalls before the first one.

  * ``--crash-in-save S``: process 0 kills itself (SIGKILL) while
    finalising the save of step ``S``, after the arrays are written and
    before the commit, as a preempted machine dies.
  """
  from madam_examples import sharded_train  # pylint: disable=import-outside-toplevel

  hook, rest = argv[0], argv[2:]
  step = int(argv[1].split(",")[0])
  process = int(rest[rest.index("--process-id") + 1])
  if hook == "--nan-on-process-1-at":
    from tests.examples import nan_injection  # pylint: disable=import-outside-toplevel

    steps = {int(s) for s in argv[1].split(",")}
    with nan_injection.nan_at(steps, poison_rows=process == 1):
      return sharded_train.main(rest)
  if hook == "--metrics-out-on-process-0-only":
    if process != 0:
      at = rest.index("--metrics-out")
      rest = rest[:at] + rest[at + 2 :]
  elif hook == "--steps-on-process-1":
    if process == 1:
      rest = [*rest, "--steps", str(step)]
  elif hook == "--stall-process-1":
    from madam_examples import data  # pylint: disable=import-outside-toplevel
    from madam_examples import processes  # pylint: disable=import-outside-toplevel

    processes.BARRIER_TIMEOUT_S = step
    if process == 1:
      load = data.load_stdlib_text

      def stalled(*args, **kwargs):
        time.sleep(LAUNCH_TIMEOUT)
        return load(*args, **kwargs)

      data.load_stdlib_text = stalled
  elif hook == "--crash-in-save":
    # Orbax-internal: the last step of a save, on the primary process.
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel

    for cls in (
      atomicity.AtomicRenameTemporaryPath,
      atomicity.CommitFileTemporaryPath,
    ):
      finalize = cls.finalize

      async def crash(self, *args, finalize=finalize, **kwargs):
        if os.path.basename(os.fspath(self.get_final())) == str(step):
          print(f"killed while saving step {step}", flush=True)
          os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)

      cls.finalize = crash
  else:
    raise SystemExit(f"unknown hook {hook!r}")
  return sharded_train.main(rest)


if __name__ == "__main__":
  sys.exit(main_with_hook(sys.argv[1:]))
