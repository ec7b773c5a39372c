"""What the example commands share: argument types and one-line errors.

Every example command fails fast on careless input with one line on stderr,
``PROG: error: WHAT``, and exit status 2, never a traceback: flag values are
checked as they are parsed (:func:`positive_int`, :func:`positive_float`,
...), every output is proven writable by creating it (:func:`output_dir`,
:func:`output_file`; also as root, to whom ``os.access`` says yes) before any
training, and bad data raises :class:`InputError`, which
:func:`one_line_errors` prints as that line. ``--quick`` means
:data:`QUICK_STEPS` steps everywhere (:func:`add_quick_flag`). This module
imports no JAX.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from typing import Any, Callable, TypeVar

# ``--quick`` (or MADAM_QUICK=1): this many training steps, in every command.
QUICK_STEPS = 20
QUICK_ENV = "MADAM_QUICK"
QUICK_HELP = (
  f"a smoke test: {QUICK_STEPS} steps unless --steps is given "
  f"(also {QUICK_ENV}=1)"
)

_F = TypeVar("_F", bound=Callable[..., Any])


class InputError(ValueError):
  """Bad input from the user: a flag's value, a path, a file's contents.

  Its message names the input, what was expected, and the fix. The commands
  print it as one line (:func:`one_line_errors`); from Python it is a
  ``ValueError``.
  """


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors are one line, exit status 2.

  argparse prints the usage before the error; here the error line stands
  alone (``--help`` prints the usage).

  Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--steps", type=positive_int)
    >>> parser.parse_args(["--steps", "0"])
    Traceback (most recent call last):
    SystemExit: 2
  """

  def error(self, message: str) -> Any:
    self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
  try:
    return kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (steps, sizes, intervals).

  Example:
    >>> positive_int("3")
    3
  """
  value = _number(text, int, "a whole number")
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0 (seeds)."""
  value = _number(text, int, "a whole number")
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
  return value


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0 (learning rates, scales).

  Example:
    >>> positive_float("1e-3")
    0.001
  """
  value = _number(text, float, "a number")
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be positive, got {text}")
  return value


def fraction(text: str) -> float:
  """argparse type: a number in [0, 1]."""
  value = _number(text, float, "a number")
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
  return value


def _nearest_existing(path: str) -> str:
  """``path`` or its closest ancestor that exists (a link counts)."""
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _reason(error: OSError) -> str:
  return error.strerror or type(error).__name__


def _make_folders(folder: str) -> list[str]:
  """Makes ``folder`` and its missing parents; returns those it made,
  deepest first (so that they can be removed in that order)."""
  made = []
  path = os.path.abspath(folder)
  while not os.path.lexists(path):
    made.append(path)
    path = os.path.dirname(path)
  for path in reversed(list(made)):
    try:
      os.mkdir(path)
    except FileExistsError:  # another process made it meanwhile
      made.remove(path)
    except OSError:
      _remove_folders(made[made.index(path) + 1 :])
      raise
  return made


def _remove_folders(made: list[str]) -> None:
  """Removes the folders :func:`_make_folders` made, if still empty."""
  for path in made:
    try:
      os.rmdir(path)
    except OSError:  # another process's probe or output is in it: keep it
      return


def prove_writable_dir(path: str) -> None:
  """Raises ``OSError`` unless a file can be created in folder ``path``.

  Proven by doing it, not with ``os.access`` (which says yes to root even
  under ``/proc`` or on a read-only mount): the missing folders are made,
  a probe file is created in the folder and removed, and so are the folders
  this call made. Nothing that existed before is touched. Several
  processes may prove the same folder at once.

  Example:
    >>> import tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), 'a', 'b')
    >>> prove_writable_dir(d)
    >>> os.path.exists(os.path.dirname(d))           # proven, then removed
    False
  """
  if os.path.lexists(path) and not os.path.isdir(path):
    raise NotADirectoryError(20, "exists and is not a folder", path)
  for attempt in range(5):
    made = _make_folders(path)
    try:
      fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
    except FileNotFoundError:  # another process removed a folder it made
      _remove_folders(made)
      if attempt == 4:
        raise
      continue
    except OSError:
      _remove_folders(made)
      raise
    os.close(fd)
    os.remove(probe)
    _remove_folders(made)
    return


def prove_writable_file(path: str) -> None:
  """Raises ``OSError`` unless file ``path`` can be written.

  Its folder is proven as in :func:`prove_writable_dir`, then the file
  itself is opened for appending (an existing file is left unchanged), and
  removed again if this call created it.

  Example:
    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), 'out', 'metrics.json')
    >>> prove_writable_file(f)
    >>> os.path.exists(f)
    False
  """
  if os.path.isdir(path):
    raise IsADirectoryError(21, "is a folder", path)
  folder = os.path.dirname(os.path.abspath(path))
  made = _make_folders(folder)
  try:
    existed = os.path.lexists(path)
    with open(path, "a", encoding="utf-8"):
      pass
    if not existed:
      os.remove(path)
  finally:
    _remove_folders(made)


def output_dir(text: str) -> str:
  """argparse type: a folder the outputs can be written to.

  Proven by creating a file in it (:func:`prove_writable_dir`), also when
  running as root; whatever the check made is removed again, so a run that
  fails leaves nothing behind.

  Example:
    >>> output_dir(".")
    '.'
  """
  if not text:
    raise argparse.ArgumentTypeError("expected a folder, got ''")
  if os.path.lexists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(
      f"{text!r} exists and is not a folder; name a folder for the "
      "outputs (made if missing)"
    )
  parent = _nearest_existing(text)
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(
      f"cannot make folder {text!r}: {parent!r} is not a folder"
    )
  try:
    prove_writable_dir(text)
  except OSError as e:
    raise argparse.ArgumentTypeError(
      f"cannot write into folder {text!r}: {_reason(e)}"
    ) from None
  return text


def output_file(text: str) -> str:
  """argparse type: a file that can be written (its folder made if missing).

  Proven by opening it for appending (:func:`prove_writable_file`), also
  when running as root; an existing file is left as it was, and whatever
  the check made is removed again.

  Example:
    >>> output_file("/etc/passwd/x.json")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: cannot write '/etc/passwd/x.json': '/etc/passwd' is not a folder
  """
  if not text:
    raise argparse.ArgumentTypeError("expected a file name, got ''")
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(
      f"{text!r} is a folder; name a file to write"
    )
  parent = _nearest_existing(os.path.dirname(os.path.abspath(text)))
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(
      f"cannot write {text!r}: {parent!r} is not a folder"
    )
  try:
    prove_writable_file(text)
  except OSError as e:
    raise argparse.ArgumentTypeError(
      f"cannot write {text!r}: {_reason(e)}"
    ) from None
  return text


def add_quick_flag(parser: argparse.ArgumentParser) -> None:
  """Adds ``--quick``, the same in every command (:data:`QUICK_HELP`)."""
  parser.add_argument("--quick", action="store_true", help=QUICK_HELP)


def quick_requested(args: argparse.Namespace) -> bool:
  """``--quick`` was given, or ``MADAM_QUICK=1`` is set."""
  return bool(getattr(args, "quick", False) or os.environ.get(QUICK_ENV) == "1")


def resolve_steps(args: argparse.Namespace, default: int) -> int:
  """``--steps`` if given, else :data:`QUICK_STEPS` when quick, else ``default``.

  Example:
    >>> import argparse
    >>> resolve_steps(argparse.Namespace(steps=7, quick=True), 1000)
    7
  """
  if args.steps is not None:
    return int(args.steps)
  return QUICK_STEPS if quick_requested(args) else int(default)


def one_line_errors(prog: str) -> Callable[[_F], _F]:
  """Decorates a command's ``main``: an :class:`InputError` becomes one line.

  The line, ``PROG: error: MESSAGE``, goes to stderr and the command exits
  with status 2, as for a bad flag; other exceptions (bugs) keep their
  traceback.

  Args:
    prog: the command's name as the user typed it (the parser's ``prog``).

  Returns:
    A decorator.
  """

  def decorate(main: _F) -> _F:
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
      try:
        return main(*args, **kwargs)
      except InputError as e:
        message = " ".join(str(e).splitlines())
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

    return wrapped  # type: ignore[return-value]

  return decorate
