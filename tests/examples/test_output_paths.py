"""Every output path of every command is proven writable before any work.

The issue's cases, walked through each command: an output under ``/proc``
(writable to ``os.access`` when running as root, yet nothing can be created
there), under a file (``/etc/passwd/x.json``, a log folder under a file),
and a module that does not exist. Each ends the command within 5 s with
exit status 2 and one line ``PROG: error: ...`` on stderr (no traceback, no
usage), having trained nothing and left nothing behind. In-process (the
same ``main``, where the 5 s are measured), plus a subprocess for the whole
path from the interpreter's start (not timed: on a loaded machine importing
JAX alone can take longer).
"""

import os
import subprocess
import sys
import time

import pytest

from madam_examples import demo
from madam_examples import launch_local
from madam_examples import sharded_train

LINUX_PROC = os.path.isdir("/proc/self")
SECONDS = 5


def _cases(tmp_path):
  """(main, prog, argv) of every output flag with each kind of bad path."""
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  under_file = str(a_file / "x")
  bad = [under_file, under_file + ".json"]
  if LINUX_PROC:
    bad += ["/proc/x", "/proc/x.json", "/etc/passwd/x.json"]
  cases = []
  for path in bad:
    cases += [
      (demo.main, demo.PROG, ["--out", path]),
      (demo.main, demo.PROG, ["--checkpoint-dir", path]),
      (sharded_train.main, sharded_train.PROG, ["--metrics-out", path]),
      (sharded_train.main, sharded_train.PROG, ["--checkpoint-dir", path]),
      (launch_local.main, launch_local.PROG, ["-n", "2", "--log-dir", path]),
    ]
  cases += [
    (sharded_train.main, sharded_train.PROG, ["--metrics-out", str(tmp_path)]),
    (
      launch_local.main,
      launch_local.PROG,
      ["-n", "2", "--module", "nonexistent.module"],
    ),
    (launch_local.main, launch_local.PROG, ["-n", "2", "--module", "nope"]),
  ]
  return cases


def _one_line(code, err, prog):
  assert code == 2, err
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"{prog}: error: argument "), lines[0]
  return lines[0]


def test_every_command_refuses_every_bad_output_path_in_one_line(
  tmp_path, capsys
):
  before = sorted(os.listdir(tmp_path))
  for main, prog, argv in _cases(tmp_path):
    before = sorted(os.listdir(tmp_path))
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
      main(argv)
    elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    _one_line(exit_info.value.code, err, prog)
    assert out == "", (argv, out)
    assert elapsed < SECONDS, (argv, elapsed)
    assert sorted(os.listdir(tmp_path)) == before, argv
  assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize(
  "module, argv",
  [
    ("sharded_train", ["--metrics-out", "{file}/m.json"]),
    ("launch_local", ["-n", "2", "--log-dir", "{file}/logs"]),
  ],
)
def test_command_fails_fast_from_the_shell(tmp_path, module, argv):
  (tmp_path / "file").write_text("")
  argv = [a.format(file=tmp_path / "file") for a in argv]
  proc = subprocess.run(
    [sys.executable, "-m", f"madam_examples.{module}", *argv],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  line = _one_line(
    proc.returncode,
    proc.stderr,
    f"python -m madam_examples.{module}" if module != "demo" else demo.PROG,
  )
  assert "is not a folder" in line, line
