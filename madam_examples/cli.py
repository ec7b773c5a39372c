"""What the example commands share: argument types and one-line errors.

Careless input ends every command with one line on stderr, ``PROG: error:
WHAT``, and exit status 2, never a traceback: flags are checked as they are
parsed, every output is proven writable by creating it before any training
(also as root, to whom ``os.access`` says yes), and bad data raises
:class:`InputError`, which :func:`one_line_errors` prints as that line.
``--quick`` means :data:`QUICK_STEPS` steps everywhere. Imports no JAX.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from typing import Any, Callable, TypeVar

QUICK_STEPS = 20  # --quick (or MADAM_QUICK=1): this many steps, everywhere
QUICK_ENV = "MADAM_QUICK"
QUICK_HELP = (
  f"a smoke test: {QUICK_STEPS} steps unless --steps is given "
  f"(also {QUICK_ENV}=1)"
)

_F = TypeVar("_F", bound=Callable[..., Any])


class InputError(ValueError):
  """Bad input from the user (a flag, a path, a file's contents); its message
  names the input and the fix, printed as one line (:func:`one_line_errors`)."""


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors are one line (no usage dump).

  Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--steps", type=positive_int)
    >>> parser.parse_args(["--steps", "0"])
    Traceback (most recent call last):
    SystemExit: 2
  """

  def error(self, message: str) -> Any:
    self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: type, what: str, ok: Callable, rule: str) -> Any:
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if not ok(value):
    raise argparse.ArgumentTypeError(f"must be {rule}, got {text.strip()}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (steps, sizes, intervals).

  Example:
    >>> positive_int("3")
    3
  """
  return _number(text, int, "a whole number", lambda v: v >= 1, "at least 1")


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0 (seeds)."""
  return _number(text, int, "a whole number", lambda v: v >= 0, "0 or more")


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0 (learning rates, scales).

  Example:
    >>> positive_float("1e-3")
    0.001
  """
  ok = lambda v: math.isfinite(v) and v > 0
  return _number(text, float, "a number", ok, "positive")


def fraction(text: str) -> float:
  """argparse type: a number in [0, 1]."""
  ok = lambda v: 0 <= v <= 1
  return _number(text, float, "a number", ok, "between 0 and 1")


def _nearest_existing(path: str) -> str:
  """``path`` or its closest ancestor that exists (a link counts)."""
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _prove_writable(path: str, is_folder: bool) -> None:
  """Raises ``OSError`` unless ``path`` can be written, proven by doing it.

  A probe file is created in folder ``path``, or file ``path`` opened for
  appending; whatever this made is removed again. Processes may prove the
  same path at once: one that finds a folder gone (another's) retries.
  """
  folder = os.path.abspath(path if is_folder else os.path.dirname(path) or ".")
  for attempt in range(5):
    made = []  # the missing folders, deepest first
    missing = folder
    while not os.path.lexists(missing):
      made.append(missing)
      missing = os.path.dirname(missing)
    try:
      os.makedirs(folder, exist_ok=True)
      if is_folder:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
      else:
        existed = os.path.lexists(path)
        with open(path, "a", encoding="utf-8"):
          pass
        if not existed:
          os.remove(path)
      return
    except FileNotFoundError:
      if attempt == 4:
        raise
    finally:
      for made_folder in made:
        try:
          os.rmdir(made_folder)
        except FileNotFoundError:  # never made
          continue
        except OSError:  # another process's probe or output is in it
          break


def output_dir(text: str) -> str:
  """argparse type: a folder the outputs can be written to (made if missing).

  Proven by creating a file in it, also when running as root; whatever the
  check made is removed again, so a run that fails leaves nothing behind.

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
    _prove_writable(text, is_folder=True)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise argparse.ArgumentTypeError(
      f"cannot write into folder {text!r}: {reason}"
    ) from None
  return text


def output_file(text: str) -> str:
  """argparse type: a file that can be written (its folder made if missing).

  Proven by opening it for appending, also when running as root; an
  existing file is left as it was, and whatever the check made is removed.

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
    _prove_writable(text, is_folder=False)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise argparse.ArgumentTypeError(
      f"cannot write {text!r}: {reason}"
    ) from None
  return text


def add_quick_flag(parser: argparse.ArgumentParser) -> None:
  """Adds ``--quick``, the same in every command."""
  parser.add_argument("--quick", action="store_true", help=QUICK_HELP)


def quick_requested(args: argparse.Namespace) -> bool:
  """``--quick`` was given, or ``MADAM_QUICK=1`` is set."""
  return bool(getattr(args, "quick", False) or os.environ.get(QUICK_ENV) == "1")


def add_run_flags(parser: argparse.ArgumentParser, steps: int) -> None:
  """Adds ``--steps`` (default ``steps``), ``--seed`` and ``--quick``, the
  same in every command; parse them with :func:`parse_run_args`."""
  add = parser.add_argument
  add("--steps", type=positive_int, help=f"training steps (default {steps})")
  add("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
  add_quick_flag(parser)


def parse_run_args(
  parser: argparse.ArgumentParser, argv: Any, steps: int
) -> argparse.Namespace:
  """``parser.parse_args(argv)``; ``quick`` is also set by ``MADAM_QUICK=1``,
  and ``steps`` defaults to :data:`QUICK_STEPS` when quick, else ``steps``.

  Example:
    >>> parser = ArgumentParser()
    >>> add_run_flags(parser, 1000)
    >>> parse_run_args(parser, ["--quick"], 1000).steps
    20
  """
  args = parser.parse_args(argv)
  args.quick = quick_requested(args)
  if args.steps is None:
    args.steps = QUICK_STEPS if args.quick else steps
  return args


def one_line_errors(prog: str) -> Callable[[_F], _F]:
  """Decorates a command's ``main``: an :class:`InputError` becomes one line,
  ``PROG: error: MESSAGE`` on stderr, and exit status 2, as for a bad flag;
  other exceptions (bugs) keep their traceback."""

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
