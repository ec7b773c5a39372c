"""Runs a multi-process JAX program on one machine, for development and tests.

Each process has its own CPU devices, their collectives going over Gloo on
``127.0.0.1``: the code path of a TPU pod or a GPU cluster, minus the
hardware. This starts ``-n`` processes of a module (default
:mod:`madam_examples.sharded_train`) with ``--coordinator-address
127.0.0.1:PORT --num-processes N --process-id I`` appended::

  python -m madam_examples.launch_local -n 2 -- --mesh data=2,fsdp=2 \\
      --simulate-devices 2 --steps 50

Process 0's output is streamed, the others' goes to ``--log-dir`` (default:
a new temporary folder). When one process fails, the others are stopped and
one line names it, followed by the end of its log. ``--timeout`` bounds the
run; the processes die with the launcher (Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Sequence

from madam_examples import cli

PROG = "python -m madam_examples.launch_local"
DEFAULT_MODULE = "madam_examples.sharded_train"
HOST = "127.0.0.1"
POLL_SECONDS = 0.05
GRACE_SECONDS = 5.0


def free_port() -> int:
  """A TCP port on ``127.0.0.1`` that nothing listens on right now.

  Example:
    >>> 1024 <= free_port() < 65536
    True
  """
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


# ``python -m MODULE ARGS``, killed when the launcher dies (PR_SET_PDEATHSIG,
# asked after exec: Python code between fork and exec can deadlock a
# multithreaded launcher, such as a test with JAX loaded).
_BOOTSTRAP = """
import ctypes, os, runpy, signal, sys
parent, module = int(sys.argv[1]), sys.argv[2]
try:
  ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
except (OSError, AttributeError):
  pass                          # not Linux: the launcher's cleanup applies
if os.getppid() != parent:      # the launcher died before the line above
  sys.exit(1)
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def process_command(module: str, args: Sequence[str], address: str, n: int,
                    i: int) -> list[str]:  # fmt: skip
  """The command line of process ``i`` of ``n``, which dies with this one.

  Example:
    >>> process_command("m", ["--steps", "5"], "127.0.0.1:1234", 2, 1)[-9:]
    ['m', '--steps', '5', '--coordinator-address', '127.0.0.1:1234', \
'--num-processes', '2', '--process-id', '1']
  """
  flags = (
    f"--coordinator-address {address} --num-processes {n} --process-id {i}"
  )
  bootstrap = [sys.executable, "-c", _BOOTSTRAP, str(os.getpid())]
  return [*bootstrap, module, *args, *flags.split()]


class LocalCluster:
  """``num_processes`` cooperating processes of ``module`` on this machine.

  ``args`` go to every process; processes 1.. write to
  ``log_dir/process_<i>.log`` (``log_paths``), process 0 to ``stdout``
  (default: the launcher's). Leaving the ``with`` block stops every process
  still running (SIGTERM, then SIGKILL). Example::

    with LocalCluster(2, ["--simulate-devices", "2", "--mesh", "data=4"]) as c:
      status = c.wait(timeout=600)
  """

  def __init__(
    self,
    num_processes: int,
    args: Sequence[str],
    *,
    module: str = DEFAULT_MODULE,
    log_dir: str | None = None,
    stdout: IO[Any] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
  ):
    self.num_processes = num_processes
    self.address = f"{HOST}:{port or free_port()}"
    self.log_dir = log_dir or tempfile.mkdtemp(prefix="launch_local-")
    os.makedirs(self.log_dir, exist_ok=True)
    self.processes: list[subprocess.Popen] = []
    self.log_paths: list[str | None] = [None]
    self.log_paths += [
      os.path.join(self.log_dir, f"process_{i}.log")
      for i in range(1, num_processes)
    ]
    self.failure: str | None = None  # one line, once one has failed
    self.failed: int | None = None  # the process that failed first
    self._files: list[IO[Any]] = []
    try:
      for i, path in enumerate(self.log_paths):
        out = open(path, "w", encoding="utf-8") if path else stdout  # pylint: disable=consider-using-with
        if path:
          self._files.append(out)
        command = process_command(module, args, self.address, num_processes, i)
        err = subprocess.STDOUT if out is not None else None
        self.processes.append(
          subprocess.Popen(command, env=env, stdout=out, stderr=err)  # pylint: disable=consider-using-with
        )
    except BaseException:
      self.stop()
      raise

  def poll(self) -> int | None:
    """``None`` while all run; else 0 when all ended well, or the status of
    the first that failed (after which every other one is stopped)."""
    codes = [p.poll() for p in self.processes]
    for i, code in enumerate(codes):
      if code not in (None, 0):
        signals = {-s.value: s.name for s in signal.Signals}
        how = f"killed by {signals.get(code, f'signal {-code}')}"
        log = self.log_paths[i]
        self.failed = i
        self.failure = (
          f"launch_local: process {i} of {self.num_processes} ended with "
          f"{f'exit status {code}' if code > 0 else how}; stopping the "
          "others" + (f" (its log: {log})" if log else "")
        )
        self.stop()
        return code
    return 0 if all(code == 0 for code in codes) else None

  def wait(self, timeout: float | None = None) -> int:
    """Waits for every process; returns 0 or the first failure's status
    (the others are stopped), or 124 after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      code = self.poll()
      if code is not None:
        return code
      if deadline is not None and time.monotonic() > deadline:
        self.failure = (
          f"launch_local: the run took more than {timeout:g} s "
          "(--timeout); stopped every process"
        )
        self.stop()
        return 124
      time.sleep(POLL_SECONDS)

  def stop(self) -> None:
    """Stops every process still running: SIGTERM, then SIGKILL."""
    for p in self.processes:
      p.terminate()  # nothing if it has ended
    deadline = time.monotonic() + GRACE_SECONDS
    for p in self.processes:
      try:
        p.wait(max(deadline - time.monotonic(), 0.01))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for f in self._files:
      f.close()
    self._files = []

  def __enter__(self) -> LocalCluster:
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()


def _module(name: str) -> str:
  """argparse type: a module that ``python -m`` can run."""
  try:
    found = importlib.util.find_spec(name)
  except (ImportError, ValueError) as e:
    raise argparse.ArgumentTypeError(f"cannot import {name!r}: {e}") from None
  if found is None:
    raise argparse.ArgumentTypeError(f"no module named {name!r}")
  return name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    usage="%(prog)s -n N [options] -- ARGS...",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Everything after -- goes to every process.",
  )
  add = parser.add_argument
  add("-n", "--num-processes", type=cli.positive_int, required=True)
  add("--module", type=_module, default=DEFAULT_MODULE, help=DEFAULT_MODULE)
  add("--timeout", type=cli.positive_float, help="seconds (then status 124)")
  add("--port", type=cli.positive_int, help="default: a free one")
  add("--log-dir", type=cli.output_dir, help="output of processes 1..")
  add("args", nargs=argparse.REMAINDER, help="the module's arguments")
  args = parser.parse_args(argv)
  if args.args and args.args[0] == "--":
    args.args = args.args[1:]
  return args


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  n, module = args.num_processes, args.module
  cluster = LocalCluster(
    n, args.args, module=module, log_dir=args.log_dir, port=args.port
  )
  say = functools.partial(print, "launch_local:", file=sys.stderr, flush=True)
  pids = ", ".join(str(p.pid) for p in cluster.processes)
  say(f"{n} processes of {module} on {cluster.address} (pids {pids}); logs "
      f"of processes 1.. in {cluster.log_dir}")  # fmt: skip

  def stop(signum, frame):  # Ctrl-C, or a scheduler's SIGTERM
    del frame
    cluster.stop()
    say(f"stopped by {signal.Signals(signum).name}")
    sys.exit(128 + signum)

  signal.signal(signal.SIGINT, stop)
  signal.signal(signal.SIGTERM, stop)
  with cluster:
    code = cluster.wait(args.timeout)
  if code:
    print(cluster.failure, file=sys.stderr, flush=True)
    log = cluster.log_paths[cluster.failed or 0]
    with contextlib.suppress(OSError):
      with open(log or "", encoding="utf-8", errors="replace") as f:
        tail = "\n".join(f.read().splitlines()[-5:])
      if tail:
        say(f"last lines of process {cluster.failed}:\n{tail}")
  return code if code >= 0 else 128 - code


if __name__ == "__main__":
  sys.exit(main())
