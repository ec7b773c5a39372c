"""What every benchmark script shares: record, options, results, bytes, steps.

* The machine record: one dictionary with one set of keys
  (:data:`MACHINE_KEYS`), written into every result beside the figures, so a
  result says where, when and how it was measured (:func:`machine_record`).
* The options every script takes: ``--quick``, ``--out``, ``--name``,
  ``--replot`` (:func:`argument_parser`, :func:`parse_args`).
* The results writer: ``<name>.json`` (the results and the record),
  ``<name>.md`` (title, the record, the script's table) and optionally
  ``<name>.png``, written the same way by every script; ``--replot`` rewrites
  the Markdown and the figure from a saved JSON, including the JSON of older
  runs whose record had other keys (:func:`write_results`, :func:`replot`).
* Counting: bytes of a pytree's arrays, in all or per device
  (:func:`tree_bytes`, :func:`bytes_per_device`: the examples' one byte
  counter, ``madam_examples.memory``), and parameters
  (:func:`param_count`).
* The pieces of a measurement several scripts use: the MLP parameter tree
  (:func:`mlp_params`), the weights as a run stores them with the optimizer
  for them (:func:`stored_for_training`), one optimizer step
  (:func:`update_and_apply`) and the quartiles of repeated timings
  (:func:`quartiles`).

The scripts in ``benchmarks/`` import this module as ``_harness``: Python puts
a script's folder on ``sys.path`` when it runs ``python benchmarks/x.py``.

Reference for Madam: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import pathlib
import platform
import shlex
import sys
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import cli
from madam_examples.memory import bytes_per_device  # noqa: F401 (re-exported)
from madam_examples.memory import tree_bytes  # noqa: F401 (re-exported)
import madam_optax

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# --------------------------------------------------------------------------
# The machine record.

MACHINE_KEYS = (
  "command",  # the command line, without --out's folder
  "date_utc",  # "YYYY-MM-DD HH:MM UTC", when the run started
  "cpu",  # CPU model name
  "cores",  # logical CPU count
  "memory_gib",  # physical memory
  "platform",  # operating system, e.g. "Linux-6.1-x86_64-..."
  "versions",  # {"python": ..., "jax": ..., ...}
  "backend",  # JAX backend, e.g. "cpu", "gpu"
  "devices",  # e.g. "8 x cpu"
  "load_average_at_start",  # [1, 5, 15 min] (a shared machine slows runs)
  "load_average_at_end",  # stamped when the results are written
)
VERSION_KEYS = ("python", "jax", "jaxlib", "optax", "flax", "madam_optax")


def cpu_model() -> str:
  """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
  fallback = platform.processor() or platform.machine() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(
        (
          line.split(":", 1)[1].strip()
          for line in f
          if line.startswith("model name")
        ),
        fallback,
      )
  except OSError:
    return fallback


def memory_gib() -> float | None:
  """Physical memory in GiB, or ``None`` where the OS does not say."""
  try:
    return round(
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    )
  except (AttributeError, OSError, ValueError):
    return None


def load_average() -> list[float] | None:
  """1, 5 and 15-minute load averages, or ``None`` where there are none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def utc_now() -> str:
  """The current UTC date and time, ``"YYYY-MM-DD HH:MM UTC"``."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.strftime("%Y-%m-%d %H:%M UTC")


def module_version(module: str) -> str | None:
  """``module.__version__``, or ``None`` if the module is not installed."""
  try:
    return getattr(importlib.import_module(module), "__version__", None)
  except ImportError:
    return None


def versions(packages: Sequence[str] = ()) -> dict[str, str | None]:
  """Python's version and those of JAX, Optax, Flax, madam-optax, and more.

  Args:
    packages: further modules, e.g. ``("orbax.checkpoint",)``; each is keyed
      by its name with dots as underscores (``"orbax_checkpoint"``).

  Returns:
    ``{"python": ..., "jax": ..., ...}``; ``None`` for a missing package.

  Example:
    >>> sorted(versions(["numpy"]))[:3]
    ['flax', 'jax', 'jaxlib']
  """
  out = {"python": platform.python_version()}
  for module in VERSION_KEYS[1:] + tuple(packages):
    out[module.replace(".", "_")] = module_version(module)
  return out


def device_summary() -> dict[str, str]:
  """The JAX backend and its devices (starts the backend if need be).

  Example:
    >>> device_summary()["backend"] == jax.default_backend()
    True
  """
  kinds = collections.Counter(d.device_kind for d in jax.devices())
  return {
    "backend": jax.default_backend(),
    "devices": ", ".join(f"{n} x {kind}" for kind, n in kinds.items()),
  }


def machine_record(
  command: str, *, packages: Sequence[str] = (), devices: bool = True
) -> dict[str, Any]:
  """Where, when and how a benchmark runs: a dictionary of :data:`MACHINE_KEYS`.

  Args:
    command: the command line (:func:`command_line`).
    packages: further modules whose versions matter (see :func:`versions`).
    devices: query JAX's backend and devices. ``False`` leaves ``backend``
      and ``devices`` ``None``, for a driver that must not start a backend
      (its subprocesses choose the device count); fill them in later.

  Returns:
    The record; ``load_average_at_end`` is ``None`` until
    :func:`write_results` stamps it.

  Example:
    >>> record = machine_record("python benchmarks/x.py --quick")
    >>> tuple(record) == MACHINE_KEYS
    True
  """
  summary = device_summary() if devices else {"backend": None, "devices": None}
  return {
    "command": command,
    "date_utc": utc_now(),
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "memory_gib": memory_gib(),
    "platform": platform.platform(),
    "versions": versions(packages),
    **summary,
    "load_average_at_start": load_average(),
    "load_average_at_end": None,
  }


def upgrade_record(results: dict[str, Any]) -> dict[str, Any]:
  """``results`` with its ``"machine"`` entry in today's keys.

  Results written before the record had one set of keys kept the date as
  ``date`` or ``date_utc`` (without "UTC"), versions at the top level, the
  command line and load averages outside the record. Entries the old record
  lacks become ``None``; the other entries of ``results`` are left as they
  are.

  Example:
    >>> old = {"machine": {"date": "2026-01-02 03:04 UTC", "jax": "0.9"},
    ...        "command": "python benchmarks/x.py", "load_before": [1.0]}
    >>> new = upgrade_record(old)["machine"]
    >>> new["command"], new["versions"]["jax"], new["load_average_at_start"]
    ('python benchmarks/x.py', '0.9', [1.0])
  """
  old = dict(results.get("machine", {}))
  if tuple(old) == MACHINE_KEYS:
    return results
  settings = results.get("settings", {})
  date = old.pop("date", None)
  date = old.pop("date_utc", None) or date
  if date is not None and not date.endswith("UTC"):
    date += " UTC"
  record = dict.fromkeys(MACHINE_KEYS)
  record.update(
    command=results.get("command", settings.get("command")),
    date_utc=date,
    versions={k: old.pop(k, None) for k in VERSION_KEYS},
    load_average_at_start=old.pop(
      "load_average_at_start", results.get("load_before")
    ),
    load_average_at_end=old.pop(
      "load_average_at_end", results.get("load_after")
    ),
  )
  devices = old.pop("devices", None)
  if isinstance(devices, list):  # device kinds, without counts
    devices = ", ".join(devices)
  record["devices"] = devices
  for key in ("cpu", "cores", "memory_gib", "platform", "backend"):
    record[key] = old.pop(key, None)
  # Whatever else the old record held (e.g. orbax_checkpoint): a version.
  record["versions"].update(
    {k: v for k, v in old.items() if isinstance(v, str)}
  )
  return {**results, "machine": record}


def machine_markdown(record: dict[str, Any]) -> str:
  """The record as a Markdown list (what every report shows first).

  Example:
    >>> print(machine_markdown(machine_record("python x.py")).splitlines()[0])
    - command: `python x.py`
  """

  def known(x):
    return "not recorded" if x is None else x

  v = record["versions"]
  memory = (
    "" if record["memory_gib"] is None else f", {record['memory_gib']} GiB"
  )
  return "\n".join(
    [
      f"- command: `{known(record['command'])}`",
      f"- date: {known(record['date_utc'])}",
      f"- machine: {known(record['cpu'])}, {known(record['cores'])} cores"
      f"{memory}",
      f"- operating system: {known(record['platform'])}",
      f"- JAX backend: {known(record['backend'])}; devices: "
      f"{known(record['devices'])}",
      "- versions: "
      + ", ".join(f"{k} {x}" for k, x in v.items() if x is not None),
      f"- load average (1, 5, 15 min) at start / end: "
      f"{known(record['load_average_at_start'])} / "
      f"{known(record['load_average_at_end'])}",
    ]
  )


# --------------------------------------------------------------------------
# Command-line options and progress.


def progress(*args: Any) -> None:
  """``print``, flushed at once: long runs' logs show where they are."""
  print(*args, flush=True)


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """``python benchmarks/<script> <argv>``, without ``--out``'s folder.

  The folder names a place on one machine, not how to reproduce the run.

  Example:
    >>> command_line("benchmarks/x.py", ["--quick", "--out", "d", "--seeds=2"])
    'python benchmarks/x.py --quick --seeds=2'
  """
  args = list(argv) if argv is not None else []
  kept, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a == "--out":
      skip = True
    elif not a.startswith("--out="):
      kept.append(a)
  return shlex.join(
    ["python", f"benchmarks/{pathlib.Path(script).name}", *kept]
  )


def argument_parser(
  doc: str | None, name: str | None
) -> argparse.ArgumentParser:
  """A parser with the options every benchmark script takes.

  Args:
    doc: the script's docstring; its first line describes the script.
    name: the default file stem of the results (``--name``).

  Returns:
    An ``argparse.ArgumentParser`` with ``--quick``, ``--out``, ``--name``
    and ``--replot``; add the script's own options, then call
    :func:`parse_args`.
  """
  parser = argparse.ArgumentParser(
    description=(doc or "").strip().split("\n")[0]
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a small, fast run (smoke test; also MADAM_QUICK=1); writes "
    "results only when --out is given",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="results folder (default benchmarks/results; none with --quick); "
    "'-' writes nothing",
  )
  parser.add_argument(
    "--name",
    default=name,
    help="file stem of the results" + (f" (default {name})" if name else ""),
  )
  parser.add_argument(
    "--replot",
    action="store_true",
    help="rewrite <name>.md (and the figure) from <out>/<name>.json; "
    "measures nothing",
  )
  return parser


def results_dir(
  out: str | None, *, quick: bool, replot: bool = False
) -> pathlib.Path | None:
  """Where results go: ``--out``, else ``benchmarks/results`` unless quick.

  Example:
    >>> results_dir(None, quick=True) is None
    True
    >>> results_dir("-", quick=False) is None
    True
    >>> results_dir(None, quick=False) == RESULTS_DIR
    True
  """
  if out == "-":
    return None
  if out is not None:
    return pathlib.Path(out)
  return None if quick and not replot else RESULTS_DIR


def parse_args(
  parser: argparse.ArgumentParser, argv: Sequence[str] | None, script: str
) -> argparse.Namespace:
  """Parses ``argv`` (``sys.argv[1:]`` if ``None``) and resolves the options.

  ``args.quick`` is also set by ``MADAM_QUICK=1``; ``args.out`` becomes a
  ``pathlib.Path`` or ``None`` (:func:`results_dir`); ``args.command`` is the
  command line to record (:func:`command_line` of the script's ``__file__``).

  Example:
    >>> p = argument_parser(__doc__, "demo")
    >>> args = parse_args(p, ["--out", "somewhere"], "benchmarks/demo.py")
    >>> args.name, str(args.out), args.command
    ('demo', 'somewhere', 'python benchmarks/demo.py')
  """
  argv = list(argv) if argv is not None else None
  args = parser.parse_args(argv)
  args.quick = args.quick or os.environ.get("MADAM_QUICK") == "1"
  args.out = results_dir(args.out, quick=args.quick, replot=args.replot)
  if args.out is not None and not args.replot:
    try:  # proven before any measurement, not after it
      cli.output_dir(str(args.out))
    except argparse.ArgumentTypeError as e:
      parser.error(f"argument --out: {e}")
  args.command = command_line(
    script, argv if argv is not None else sys.argv[1:]
  )
  return args


# --------------------------------------------------------------------------
# Results: JSON, Markdown and a figure, written the same way by every script.


class Report(NamedTuple):
  """How a script presents its results.

  Attributes:
    title: the Markdown title.
    body: ``results -> Markdown`` below the machine record (tables, notes);
      it reads only what the JSON holds, so ``--replot`` can call it.
    figure: ``(results, pyplot) -> figure``, or ``None`` for no figure.
  """

  title: str
  body: Callable[[dict[str, Any]], str]
  figure: Callable[[dict[str, Any], Any], Any] | None = None


def markdown(name: str, results: dict[str, Any], report: Report) -> str:
  """Title, machine record, the script's body, and where the data are.

  Example:
    >>> r = Report("Demo", lambda res: f"{res['n']} runs.")
    >>> text = markdown("demo", {"machine": machine_record("x"), "n": 3}, r)
    >>> text.splitlines()[0], "3 runs." in text
    ('# Demo', True)
  """
  files = f"Raw numbers: `{name}.json`."
  if report.figure is not None:
    files += f" Figure: `{name}.png`."
  return (
    f"# {report.title}\n\n{machine_markdown(results['machine'])}\n\n"
    f"{report.body(results).rstrip()}\n\n{files}\n"
  )


def _json_default(x: Any) -> Any:
  if hasattr(x, "tolist"):  # NumPy and JAX scalars and arrays
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable: {x!r}")


def render(
  out: pathlib.Path, name: str, results: dict[str, Any], report: Report
) -> list[pathlib.Path]:
  """Writes ``<name>.md`` (and ``<name>.png``) from ``results``; no JSON.

  Returns:
    The paths written.
  """
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / f"{name}.md"]
  paths[0].write_text(markdown(name, results, report), encoding="utf-8")
  if report.figure is not None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig = report.figure(results, plt)
    fig.tight_layout()
    paths.append(out / f"{name}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def write_results(
  out: pathlib.Path | None,
  name: str,
  results: dict[str, Any],
  report: Report,
  log: Callable[..., Any] = progress,
) -> list[pathlib.Path]:
  """Stamps the end-of-run load average and writes the results.

  Args:
    out: the folder (created if need be); ``None`` writes no file and logs
      the Markdown instead.
    name: the file stem.
    results: JSON-serialisable results (NumPy values allowed) with the
      ``"machine"`` record.
    report: the script's :class:`Report`.
    log: where messages go.

  Returns:
    The paths written: ``<name>.json``, ``<name>.md``, maybe ``<name>.png``.
  """
  results["machine"]["load_average_at_end"] = load_average()
  if out is None:
    log(markdown(name, results, report))
    return []
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(
    json.dumps(results, indent=1, default=_json_default) + "\n",
    encoding="utf-8",
  )
  paths = [path] + render(out, name, results, report)
  log("wrote " + ", ".join(str(p) for p in paths))
  return paths


def read_results(path: str | os.PathLike) -> dict[str, Any]:
  """A saved JSON, its machine record in today's keys (:func:`upgrade_record`)."""
  with open(path, encoding="utf-8") as f:
    return upgrade_record(json.load(f))


def replot(
  out: pathlib.Path | None,
  name: str,
  report: Report,
  log: Callable[..., Any] = progress,
) -> dict[str, Any]:
  """Rewrites ``<name>.md`` (and the figure) from ``<out>/<name>.json``.

  The JSON itself is left as it is. Returns the results read.
  """
  out = RESULTS_DIR if out is None else out
  results = read_results(out / f"{name}.json")
  log(
    "rewrote " + ", ".join(str(p) for p in render(out, name, results, report))
  )
  return results


# --------------------------------------------------------------------------
# Counting parameters and bytes.


def _arrays(tree: Any) -> list[Any]:
  """The leaves of ``tree`` that hold storage (have ``nbytes``)."""
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]


def array_count(tree: Any) -> int:
  """Number of array leaves in ``tree`` (see :func:`tree_bytes`)."""
  return len(_arrays(tree))


def param_count(tree: Any) -> int:
  """Number of scalar parameters (elements) in ``tree``'s arrays.

  Example:
    >>> param_count({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
    16
  """
  return sum(int(np.size(x)) for x in _arrays(tree))


# --------------------------------------------------------------------------
# Pieces of a measurement.


def mlp_params(dims: Sequence[int], seed: int = 0) -> dict[str, Any]:
  """An MLP's parameters: LeCun-normal kernels, zero biases.

  ``dense{i}`` holds ``kernel`` of shape ``(dims[i], dims[i + 1])``, entries
  ``N(0, 1 / dims[i])``, and ``bias`` of zeros (the leaves Madam cannot move,
  which ``madam_optax.with_additive_fallback`` sends to Adam).

  Example:
    >>> p = mlp_params((4, 3, 2))
    >>> p["dense1"]["kernel"].shape, param_count(p)
    ((3, 2), 23)
  """
  params = {}
  keys = jax.random.split(jax.random.key(seed), len(dims) - 1)
  for i, (a, b, k) in enumerate(zip(dims[:-1], dims[1:], keys)):
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
      "bias": jnp.zeros(b),
    }
  return params


def stored_for_training(
  params: Any,
  tx: optax.GradientTransformation,
  fmt: madam_optax.LNSFormat | None = None,
  *,
  additive: bool = True,
) -> tuple[dict[str, Any], optax.GradientTransformation]:
  """The weights as a training run stores them, and the optimizer for them.

  Args:
    params: the float32 initial weights.
    tx: the optimizer, e.g. ``madam_optax.madam()`` (with ``fmt``:
      ``madam_optax.lns_madam(fmt)``).
    fmt: store the weights as this LNS format's integer codes, with their
      per-tensor scales (``madam_optax.lns_encode_tree``); ``None`` keeps
      them float.
    additive: send the leaves that are zero at initialisation to
      ``optax.adam(1e-3)`` (``madam_optax.with_additive_fallback``: Madam
      cannot move them); ``False`` gives every leaf to ``tx``.

  Returns:
    ``(stored, tx)``: ``stored["params"]`` holds the weights or codes (and
    ``stored["scales"]`` the scales, with ``fmt``); ``tx`` trains
    ``stored["params"]``.

  Example:
    >>> fmt = madam_optax.LNSFormat.spanning(127)
    >>> stored, tx = stored_for_training(
    ...     mlp_params((4, 3)), madam_optax.lns_madam(fmt), fmt)
    >>> str(stored["params"]["dense0"]["kernel"].dtype), stored["scales"][
    ...     "dense0"]["bias"] is None
    ('int8', True)
  """
  stored = {"params": params}
  if fmt is not None:
    stored["params"], stored["scales"] = madam_optax.lns_encode_tree(
      params, fmt
    )
  if additive:
    tx = madam_optax.with_additive_fallback(
      stored["params"], tx, optax.adam(1e-3)
    )
  return stored, tx


def update_and_apply(
  tx: optax.GradientTransformation, grads: Any, state: Any, params: Any
) -> tuple[Any, Any]:
  """One optimizer step: ``tx.update`` then ``optax.apply_updates``.

  Returns:
    ``(new params, new state)``.

  Example:
    >>> p, s = update_and_apply(optax.sgd(0.5), {"w": jnp.ones(2)},
    ...                         optax.sgd(0.5).init(None), {"w": jnp.ones(2)})
    >>> p["w"].tolist()
    [0.5, 0.5]
  """
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
  """(first quartile, median, third quartile) of repeated measurements.

  Example:
    >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (2.0, 3.0, 4.0)
  """
  q1, med, q3 = np.percentile(np.asarray(xs, np.float64), [25, 50, 75])
  return float(q1), float(med), float(q3)
