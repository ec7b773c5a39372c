"""What the example commands print: their accuracies, as a results file.

The README and the docs quote the accuracy of the example commands; this
script runs those commands in-process, exactly as a user types them, and
keeps what they return, so every quoted figure comes from a committed file:

* ``madam-demo``: the learning-rate sweep (Madam, Adam and SGD at nine rates
  from 1e-4 to 1, three seeds; accuracy, final training loss, each
  optimizer's good rates), also drawn as this script's figure;
* ``madam-demo --compare``: Madam at 0.01 and Adam at 1e-3, one run each;
* ``python -m madam_examples.lns_digits`` (MLP) and ``--model cnn``: float32
  Madam against int8 LNS-Madam, the same initial weights;
* ``python -m madam_examples.equinox_mlp``: Madam on an Equinox MLP.

Usage::

  nice python benchmarks/example_accuracy.py          # writes benchmarks/results/example_accuracy.{json,md,png}
  python benchmarks/example_accuracy.py --quick       # every command with --quick, prints only
  python benchmarks/example_accuracy.py --replot      # the tables and figure from the JSON

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import tempfile
import time
from typing import Any

import _harness as harness

NAME = "example_accuracy"


def _quiet(fn, *args):
  """``fn(*args)`` with its printed output kept, not shown."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    value = fn(*args)
  return value, out.getvalue()


def measure(quick: bool, log) -> dict[str, Any]:
  """Runs each example command; what it returned, and its wall time."""
  from madam_examples import demo  # pylint: disable=import-outside-toplevel
  from madam_examples import equinox_mlp  # pylint: disable=import-outside-toplevel
  from madam_examples import lns_digits  # pylint: disable=import-outside-toplevel

  flag = ["--quick"] if quick else []
  runs: dict[str, Any] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, argv in (
      ("madam-demo", []),
      ("madam-demo --compare", ["--compare"]),
    ):
      out = pathlib.Path(tmp, name.replace(" ", "_"))
      t0 = time.perf_counter()
      _, printed = _quiet(demo.main, [*argv, *flag, "--out", str(out)])
      seconds = time.perf_counter() - t0
      stem = "mlp" if argv else "sweep"
      record = json.loads((out / f"{stem}.json").read_text())
      record.pop("history", None)
      record.pop("command", None)
      runs[name] = {"seconds": round(seconds, 1), "record": record}
      log(f"{name}: {seconds:.0f} s")
  for name, argv in (
    ("python -m madam_examples.lns_digits", []),
    ("python -m madam_examples.lns_digits --model cnn", ["--model", "cnn"]),
  ):
    t0 = time.perf_counter()
    result, _ = _quiet(lns_digits.main, [*argv, *flag])
    runs[name] = {
      "seconds": round(time.perf_counter() - t0, 1),
      "float_accuracy": round(result["float_accuracy"], 2),
      "lns_accuracy": round(result["lns_accuracy"], 2),
      "float_param_bytes": result["float_param_bytes"],
      "lns_param_bytes": result["lns_param_bytes"],
      "lns_dtypes": result["lns_dtypes"],
      "steps": result["steps"],
    }
    log(f"{name}: {runs[name]['seconds']:.0f} s")
  t0 = time.perf_counter()
  result, _ = _quiet(equinox_mlp.main, flag)
  runs["python -m madam_examples.equinox_mlp"] = {
    "seconds": round(time.perf_counter() - t0, 1),
    "test_accuracy": round(100 * float(result.test_accuracy), 2),
    "first_loss": float(result.losses[0]),
    "final_loss": float(result.losses[-1]),
    "steps": len(result.losses),
  }
  return runs


def _body(results: dict[str, Any]) -> str:
  runs = results["runs"]
  sweep = runs["madam-demo"]["record"]
  lines = [
    "Each command as a user types it (`madam-demo` with `--out` to a "
    "temporary folder), one after the other in one process; accuracies in "
    "% on held-out digits (450 images).",
    "",
    f"## `madam-demo`: {sweep['task']}, {sweep['steps']} steps, seeds "
    f"{', '.join(map(str, sweep['seeds']))} ({runs['madam-demo']['seconds']} "
    "s with compilation)",
    "",
    "Good: mean accuracy within "
    f"{sweep['good_within_points']:g} point of the optimizer's best rate's; "
    "spread: log10(largest good rate / smallest).",
    "",
    "| optimizer | default rate | accuracy there | best rate | best accuracy "
    "| good rates | spread (decades) |",
    "|---|---|---|---|---|---|---|",
  ]
  for opt, r in sweep["results"].items():
    good = r["good_rates"]
    lines.append(
      f"| {opt} | {r['default_rate']:g} | {r['accuracy_at_default']:.2f} "
      f"| {r['best_rate']:.2g} | {r['best_accuracy']:.2f} "
      f"| {min(good):.2g} - {max(good):.2g} "
      f"| {r['good_spread_decades']:.1f} |"
    )
  compare = runs["madam-demo --compare"]["record"]
  lines += [
    "",
    f"## `madam-demo --compare`: {compare['task']}, {compare['steps']} steps",
    "",
    "| optimizer | learning rate | final accuracy | best accuracy |",
    "|---|---|---|---|",
  ]
  for r in compare["results"]:
    lines.append(
      f"| {r['optimizer']} | {r['lr']:g} | {r['final']:.2f} | {r['best']:.2f} |"
    )
  lines += [
    "",
    "## `lns_digits`: float32 Madam against int8 LNS-Madam, one seed",
    "",
    "| command | steps | float32 accuracy | int8 accuracy | float32 bytes "
    "| int8 bytes |",
    "|---|---|---|---|---|---|",
  ]
  for name, r in runs.items():
    if "lns_accuracy" in r:
      lines.append(
        f"| `{name}` | {r['steps']} | {r['float_accuracy']:.2f} "
        f"| {r['lns_accuracy']:.2f} | {r['float_param_bytes']:,} "
        f"| {r['lns_param_bytes']:,} |"
      )
  eqx = runs["python -m madam_examples.equinox_mlp"]
  lines += [
    "",
    "## `equinox_mlp`",
    "",
    f"{eqx['steps']} steps: training loss {eqx['first_loss']:.3f} -> "
    f"{eqx['final_loss']:.3f}, test accuracy {eqx['test_accuracy']:.2f} %.",
  ]
  return "\n".join(lines)


def _figure(results: dict[str, Any], plt):
  del plt  # the sweep's figure is drawn without pyplot
  from madam_examples import demo  # pylint: disable=import-outside-toplevel
  from madam_examples import sweep  # pylint: disable=import-outside-toplevel

  record = results["runs"]["madam-demo"]["record"]
  return sweep.figure(record, demo.LABELS)


REPORT = harness.Report(
  "What the example commands print (digits, CPU)", _body, _figure
)


def main(argv=None, log=harness.progress) -> dict[str, Any]:
  parser = harness.argument_parser(__doc__, NAME)
  args = harness.parse_args(parser, argv, "benchmarks/example_accuracy.py")
  if args.replot:
    return harness.replot(args.out, args.name, REPORT, log)
  results = {"machine": harness.machine_record(args.command)}
  results["runs"] = measure(args.quick, log)
  harness.write_results(args.out, args.name, results, REPORT, log)
  return results


if __name__ == "__main__":
  main()
