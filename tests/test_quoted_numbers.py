"""Every number the README and the docs quote from a results file is true.

Each quote below is a function that computes, from a committed file in
``benchmarks/results/``, the exact text a page must contain; the test fails
when the page does not contain it (the page drifted, or the results were
rerun), and its message gives the text to paste. Whitespace and line breaks
do not matter, so the text can be wrapped freely in the page.

To add a checked number: write the sentence (or table) in the page, then a
function here that rebuilds it from the JSON, decorated with the pages that
quote it::

  @quote("README.md", "docs/lns.md")
  def int8_bytes_per_weight() -> str:
    row = _lns_memory_row("digits MLP 64-128-10", "lns_madam int8 + bf16 v")
    return f"{row['bytes_per_weight']:g} bytes per weight"

``python tests/test_quoted_numbers.py`` prints every quote as computed now.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
import sys
from typing import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (function, pages): filled by @quote.
QUOTES: list[tuple[Callable[[], str | tuple[str, ...]], tuple[str, ...]]] = []


def quote(*pages: str):
  """Registers a function whose text every page in ``pages`` must contain."""

  def register(fn: Callable[[], str | tuple[str, ...]]):
    QUOTES.append((fn, pages))
    return fn

  return register


@functools.cache
def results(stem: str) -> dict:
  """``benchmarks/results/<stem>.json``."""
  return json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8"))


def page_text(page: str) -> str:
  """A page's text; for a ``.py`` file its docstrings, for a notebook its
  cells' sources."""
  text = (ROOT / page).read_text(encoding="utf-8")
  if page.endswith(".ipynb"):
    return "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])
  return text


def _squash(text: str) -> str:
  """Whitespace runs (line breaks, a docstring's indent) as one space."""
  return re.sub(r"\s+", " ", text).strip()


def _rate(r: float) -> str:
  return f"{r:g}"


def _rates(rates) -> str:
  """``[0.01, 0.1]`` -> ``"0.01 or 0.1"``."""
  names = [_rate(r) for r in sorted(rates)]
  return (
    ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
  )


# ------------------------------------------------- the learning-rate study
# benchmarks/results/lr_sweep.json: Madam at each task's p_scale, Adam and
# SGD, step decay (the paper's schedule), every task and budget.


def _benchmark(name: str):
  path = str(ROOT / "benchmarks")
  if path not in sys.path:
    sys.path.insert(0, path)
  return __import__(name)


def _step_cells(optimizer: str) -> dict:
  """Cell -> (steps, best rate, rates within noise of the best)."""
  lr_sweep = _benchmark("lr_sweep")
  sweep = results("lr_sweep")
  tasks = sweep["tasks"]
  out = {}
  for cell, record in lr_sweep.main_cells(sweep).items():
    if cell.schedule == "step" and cell.optimizer == optimizer:
      near = lr_sweep.near_best(record["values"], tasks[cell.task])
      out[cell] = (record["steps"], near[0], set(near))
  return out


def _from_steps_on(rate: float) -> int:
  """The fewest steps from which ``rate`` was within noise of Madam's best in
  every step-decay cell that long or longer."""
  cells = sorted(_step_cells("madam").values(), key=lambda c: c[0])
  start = cells[-1][0]
  for steps, _, near in reversed(cells):
    if rate not in near:
      break
    start = steps
  return start


@quote("README.md", "docs/index.md")
def study_best_rates() -> str:
  sweep = results("lr_sweep")
  steps = [c["steps"] for c in sweep["cells"].values()]
  best = {
    o: {c[1] for c in _step_cells(o).values()} for o in ("madam", "adam", "sgd")
  }
  words = {3: "three", 4: "four", 5: "five"}
  return (
    f"{words[len(sweep['tasks'])]} small models, {min(steps)} to "
    f"{max(steps)} steps, "
    f"step decay, {sweep['settings']['seeds']} seeds) Madam's best rate was "
    f"{_rates(best['madam'])} on every model and budget, Adam's anywhere from "
    f"{_rate(min(best['adam']))} to {_rate(max(best['adam']))}, SGD's from "
    f"{_rate(min(best['sgd']))} to {_rate(max(best['sgd']))}"
  )


@quote(
  "README.md",
  "docs/index.md",
  "madam_optax/_src/alias.py",
  "notebooks/01_quickstart.ipynb",
  "notebooks/02_learning_rate_robustness.ipynb",
)
def learning_rate_story() -> str:
  """The one learning-rate sentence: the default, then what the study found."""
  cells = _step_cells("madam")
  start = _from_steps_on(0.1)
  long = [c for c in cells if cells[c][0] >= start]
  everywhere_01 = all(0.1 in cells[c][2] for c in long)
  tasks_001 = sorted(
    {c.task for c in long} - {c.task for c in long if 0.01 not in cells[c][2]}
  )
  assert everywhere_01 and tasks_001 == ["mlp"], (everywhere_01, tasks_001)
  return (
    f"from {start} steps on, 0.1 was within noise of the best rate on every "
    "model, the default 0.01 only on the MLP"
  )


@quote("README.md")
def transformer_gap() -> str:
  (a, b), (n, m) = [_arm_gap(x, "madam") for x in (4, 16)], _steps(4, 16)
  return f"({a:.0f} % worse perplexity at {n} steps, {b:.0f} % at {m}"


@quote("README.md")
def recipe_gap() -> str:
  """The Transformer recipe (with b1) against the best-tuned Adam."""
  (a, b), (n, m) = [_arm_gap(x, "recipe_b1") for x in (4, 16)], _steps(4, 16)
  return f"({a:+.1f} % at {n} steps, {b:+.1f} % at {m} against Adam's best"


@quote("docs/zero_and_sign.md")
def recipe_page_gaps() -> str:
  """The zero-and-sign page's gaps: Madam, the recipe and the recipe + b1."""
  gap = _arm_gap
  n, m = _steps(4, 16)
  return (
    f"ends {gap(4, 'madam'):.0f} % ({n:,} steps) to "
    f"{gap(16, 'madam'):.0f} % ({m:,} steps) behind a tuned Adam"
  ), (
    f"the recipe came within {gap(4, 'recipe'):.1f} % of the best-tuned "
    f"Adam at {n:,} steps ({gap(4, 'recipe_b1'):+.1f} % with "
    f"`b1=0.9`) and within {gap(16, 'recipe'):.1f} % "
    f"({gap(16, 'recipe_b1'):.1f} %) at {m:,}"
  )


def _find(rows, **match) -> dict:
  """The first row (a dict) holding every ``key=value`` of ``match``."""
  for row in rows:
    if all(row[k] == v for k, v in match.items()):
      return row
  raise KeyError(match)


def _step_memory_row(config: str, stem: str = "step_memory") -> dict:
  (model,) = results(stem)["results"].values()
  return _find(model["rows"], config=config)


@quote("README.md")
def whole_step_bytes() -> str:
  layered = _step_memory_row("lns factored, scanned + release + bf16 compute")
  adam = _step_memory_row("adam")
  plain = _step_memory_row("lns factored")
  return (
    f"{layered['whole_per_param']:.2f} bytes per parameter on a "
    "GPT-2-small-shaped decoder when each block is decoded, differentiated "
    "and updated one at a time (`madam_examples/lns_layers.py`), against "
    f"{adam['whole_per_param']:.2f} for Adam and "
    f"{plain['whole_per_param']:.2f} for the plain int8 step"
  )


@quote("docs/lns.md")
def whole_step_table() -> str:
  names = (
    ("adam", "`optax.adam`, float32"),
    ("madam factored", "`madam(factored=True)`, float32"),
    ("lns bf16 v", "`lns_madam(fmt, state_dtype=jnp.bfloat16)`, int8"),
    (
      "lns factored",
      "`lns_madam(fmt, factored=True)`, int8, `lns_value_and_grad`",
    ),
    (
      "lns factored, scanned + release",
      "the same, blocks scanned, each update as its gradient exists",
    ),
  )
  lines = [
    "| optimizer and step | whole step B/param | of which temporaries | at "
    "rest B/param |",
    "|---|---:|---:|---:|",
  ]
  for config, name in names:
    r = _step_memory_row(config)
    lines.append(
      f"| {name} | {r['whole_per_param']:.2f} | "
      f"{r['temporaries_per_param']:.2f} | {r['at_rest_per_param']:.3f} |"
    )
  r = _step_memory_row("lns factored, scanned + release + bf16 compute")
  lines.append(
    "| the same, bfloat16 compute (the recommended path) | "
    f"**{r['whole_per_param']:.2f}** | {r['temporaries_per_param']:.2f} | "
    f"{r['at_rest_per_param']:.3f} |"
  )
  return f"{r['parameters']:,} parameters", "\n".join(lines)


def _budget_row(config: str) -> dict:
  return _find(results("step_memory_budget")["budget"]["rows"], config=config)


@quote("README.md")
def budget_decoders_readme() -> str:
  adam = _budget_row("adam, scanned")
  lns = _budget_row("lns factored, scanned + release + bf16 compute")
  gib = results("step_memory_budget")["budget"]["gib"]
  return (
    f"in a {gib:g} GiB step that is a decoder of {lns['depth']} blocks "
    f"({lns['parameters']:,} parameters) against Adam's {adam['depth']} "
    f"({adam['parameters']:,})"
  )


@quote("docs/lns.md")
def budget_decoders_docs() -> str:
  budget = results("step_memory_budget")["budget"]
  adam = _budget_row("adam, scanned")
  factored = _budget_row("madam factored, scanned")
  lns = _budget_row("lns factored, scanned + release + bf16 compute")
  run = budget["run"]
  assert run["peak_rss_is_the_steps_own"] and run["depth"] == lns["depth"]
  return (
    f"whose compiled step needs at most {budget['gib']:g} GiB: "
    f"{adam['depth']} blocks ({adam['parameters']:,} parameters) for "
    f"`optax.adam`, {factored['depth']} ({factored['parameters']:,}) for "
    f"`madam(factored=True)` and {lns['depth']} ({lns['parameters']:,}) for "
    "the int8 layer-at-a-time path, "
    f"{lns['parameters'] / adam['parameters']:.1f} times Adam's parameters. "
    f"Three real steps of the int8 path at {run['depth']} blocks on the "
    f"2-core CPU: the process held {run['rss_gib_before_the_steps']:.2f} GiB "
    f"before the first step and peaked at {run['peak_rss_gib']:.2f} GiB "
    f"during the steps, against XLA's {lns['whole_step'] / 2**30:.2f} GiB for "
    f"the step itself; it started at {run['peak_rss_gib_at_start']:.2f} GiB "
    "before any model existed"
  )


@quote("docs/lns.md")
def layered_training_result() -> str:
  data = results("step_memory_training")["training"]
  today, layered = data["rows"]
  return (
    f"{data['steps']} steps of `lns_madam(int8, factored=True)` at "
    f"{data['learning_rate']:g}, {len(data['seeds'])} seeds: validation "
    f"perplexity {today['mean']:.2f} ± {today['std']:.2f} by today's int8 "
    f"step and {layered['mean']:.2f} ± {layered['std']:.2f} by the "
    "layer-at-a-time step"
  )


@quote("docs/checkpointing.md")
def checkpoint_bytes_table() -> str:
  data = results("checkpoint_bytes")
  names = {
    "madam": "`madam`, float32",
    "madam_bf16": "`madam`, bfloat16 second moment",
    "lns_madam_int8": "`lns_madam`, 8-bit codes",
    "lns_madam_int8_bf16": "`lns_madam`, 8-bit codes, bfloat16 second moment",
    "adam": "`optax.adam`, float32",
  }
  rows = {r["optimizer"]: r for r in data["rows"]}
  lines = [
    "| optimizer | full training state: disk (memory) | parameters only: "
    "disk (memory) |",
    "|---|---:|---:|",
  ]
  for key, name in names.items():
    full, params = rows[key]["full"], rows[key]["params"]
    lines.append(
      f"| {name} | {full['disk_bytes_per_param']:.2f} "
      f"({full['memory_bytes_per_param']:.2f}) | "
      f"{params['disk_bytes_per_param']:.2f} "
      f"({params['memory_bytes_per_param']:.2f}) |"
    )
  return (
    f"({data['n_params'] / 1e6:.2f}M parameters) after {data['steps']} steps",
    ("\n".join(lines)),
  )


# ------------------------------------------------------- memory and state


def _step_row(tree: str, optimizer: str, stem: str = "step_time_cpu") -> dict:
  rows = _find(results(stem)["trees"], tree=tree)["rows"]
  return _find(rows, optimizer=optimizer)


@quote("README.md")
def state_bytes() -> str:
  per = {
    o: _step_row("mlp", o)["state_full_bytes_per_param"]
    for o in ("madam", "madam_bf16", "adam")
  }
  return (
    f"{per['madam']:g} bytes per parameter in float32, {per['madam_bf16']:g} "
    f"in bfloat16 (Adam keeps {per['adam']:g})"
  )


def _lns_memory_row(model: str, config: str) -> dict:
  return _find(results("lns_memory")["results"][model]["rows"], config=config)


@quote("README.md")
def int8_bytes() -> str:
  bf16 = _lns_memory_row("digits MLP 64-128-10", "lns_madam int8 + bf16 v")
  gpt2 = _lns_memory_row("GPT-2 small (124M)", "lns_madam int8 + factored v")
  adam = _lns_memory_row("GPT-2 small (124M)", "adam fp32")
  return (
    f"{bf16['bytes_per_weight']:g} bytes per weight with a bfloat16 optimizer "
    f"state, and about **1 byte per parameter** with a factored second moment "
    f"({gpt2['bytes_per_param']:.3f} on a GPT-2-small-shaped tree), against "
    f"Adam's {adam['bytes_per_param']:.0f}"
  )


# ------------------------------------------------------ docs/lns.md's figures


def _bits_row(model: str, method: str, **match) -> dict:
  rows = results("lns_bits")["results"][model]["rows"]
  return _find(rows, method=method, **match)


@quote("docs/lns.md")
def lns_bits_table() -> str:
  res = results("lns_bits")["results"]
  lines = [
    "| digits | float Madam | smallest width within 0.5 points: LNS-Madam "
    "stochastic | LNS-Madam nearest |",
    "|---|---:|---:|---:|",
  ]
  for model, name in (("mlp", "MLP"), ("cnn", "CNN")):
    madam = res[model]["float"]["madam"]
    small = res[model]["smallest_bits"]
    stoch = _bits_row(model, "lns_madam_stoch", bits=small["lns_madam_stoch"])
    near = _bits_row(model, "lns_madam_det", bits=small["lns_madam_det"])
    lines.append(
      f"| {name} | {madam['mean']:.2f} +- {madam['std']:.2f} | "
      f"{stoch['bits']} exponent bits + sign = {stoch['bits'] + 1} bits "
      f"({stoch['mean']:.2f}) | {near['bits']} + sign = {near['bits'] + 1} "
      f"bits ({near['mean']:.2f}) |"
    )
  at127 = {
    m: [_bits_row(k, m, levels=127)["mean"] for k in ("mlp", "cnn")]
    for m in ("lns_madam_stoch", "adam_proj", "sgd_proj")
  }
  return "\n".join(lines), (
    "At 127 levels (`int8` codes) stochastic LNS-Madam reaches "
    f"{at127['lns_madam_stoch'][0]:.2f} (MLP) and "
    f"{at127['lns_madam_stoch'][1]:.2f} (CNN); Adam projected onto the same "
    f"grid gets {at127['adam_proj'][0]:.2f} and {at127['adam_proj'][1]:.2f}, "
    f"SGD {at127['sgd_proj'][0]:.2f} and {at127['sgd_proj'][1]:.2f}."
  )


@quote("docs/lns.md")
def lns_memory_table() -> str:
  model = "MLP 784-1024-1024-1024-10"
  n = results("lns_memory")["results"][model]["parameters"]
  names = (
    (
      "lns_madam int8 + bf16 v",
      "`lns_madam`, int8 codes, bfloat16 second moment",
    ),
    (
      "lns_madam int8 + fp32 v",
      "`lns_madam`, int8 codes, float32 second moment",
    ),
    (
      "lns_madam int16 + fp32 v",
      "`lns_madam`, int16 codes, float32 second moment",
    ),
    ("madam fp32", "`madam`, float32"),
    ("adam fp32", "`optax.adam`, float32"),
  )
  lines = [
    "| configuration | bytes/param | per weight-matrix element |",
    "|---|---:|---:|",
  ]
  for config, name in names:
    row = _lns_memory_row(model, config)
    lines.append(
      f"| {name} | {row['bytes_per_param']:.3f} | "
      f"{row['bytes_per_weight']:.2f} |"
    )
  return f"({n / 1e6:.1f}M parameters;", "\n".join(lines)


@quote("docs/lns.md")
def lns_factored_table() -> str:
  model = "GPT-2 small (124M)"
  rows = (
    ("madam fp32", "`madam`, float32", "{:.3f}"),
    ("madam fp32 + factored v", "`madam(factored=True)`, float32", "{:.3f}"),
    ("lns_madam int8 + fp32 v", "`lns_madam`, int8 + float32 v", "{:.3f}"),
    ("lns_madam int8 + bf16 v", "`lns_madam`, int8 + bfloat16 v", "{:.3f}"),
    (
      "lns_madam int8 + factored v",
      "`lns_madam(factored=True)`, int8",
      "**{:.3f}**",
    ),
  )
  adam = _lns_memory_row(model, "adam fp32")["bytes_per_param"]
  lines = [f"| Adam, float32 | 12 | measured (GPT-2 small: {adam:.3f}) |"]
  for config, name, fmt in rows:
    value = fmt.format(_lns_memory_row(model, config)["bytes_per_param"])
    lines.append(f"| {name} | {value} | measured, GPT-2 small |")
  return tuple(lines)


@quote("docs/lns.md")
def lns_factored_accuracy() -> str:
  data = results("factored_accuracy")
  res = data["results"]

  def means(task):
    c = res[task]["configs"]
    keys = ("madam", "madam factored", "lns int8 factored")
    return [c[k]["mean"] for k in keys]

  mlp, cnn, lm = means("digits MLP"), means("digits CNN"), means("Transformer")
  return (
    f"digits MLP ({res['digits MLP']['steps']} steps) Madam {mlp[0]:.2f} %, "
    f"Madam factored {mlp[1]:.2f} %, int8 LNS factored {mlp[2]:.2f} %; "
    f"digits CNN ({res['digits CNN']['steps']} steps) {cnn[0]:.2f} %, "
    f"{cnn[1]:.2f} %, {cnn[2]:.2f} %; character Transformer "
    f"({res['Transformer']['steps']} steps) perplexity {lm[0]:.2f}, "
    f"{lm[1]:.2f}, {lm[2]:.2f} ({100 * (lm[2] / lm[0] - 1):+.1f} %)."
  )


# ------------------------------------------------- what the examples print


def _examples() -> dict:
  return results("example_accuracy")["runs"]


@quote("README.md", "docs/index.md")
def demo_sweep() -> str:
  sweep = _examples()["madam-demo"]["record"]
  names = {"madam": "Madam", "adam": "Adam", "sgd": "SGD"}
  parts = []
  for opt, r in sweep["results"].items():
    good = r["good_rates"]
    default = "" if r["default_is_good"] else ", its default not among them"
    parts.append(
      f"{names[opt]} from {min(good):.2g} to {max(good):.2g} "
      f"({r['good_spread_decades']:.1f} decades{default})"
    )
  return (
    f"In the committed run ({sweep['steps']} steps, cosine decay, "
    f"{len(sweep['seeds'])} seeds) the good rates were: " + ", ".join(parts)
  )


@quote("README.md")
def lns_digits_accuracy() -> str:
  mlp = _examples()["python -m madam_examples.lns_digits"]
  cnn = _examples()["python -m madam_examples.lns_digits --model cnn"]
  return (
    f"{mlp['lns_accuracy']:.2f} % test accuracy with int8 weights against "
    f"{mlp['float_accuracy']:.2f} % for float32 Madam (`--model cnn`: "
    f"{cnn['lns_accuracy']:.2f} % against {cnn['float_accuracy']:.2f} %)"
  )


@quote("README.md")
def lns_digits_bytes() -> str:
  mlp = _examples()["python -m madam_examples.lns_digits"]
  return (
    f"{mlp['lns_param_bytes']:,} parameter bytes against "
    f"{mlp['float_param_bytes']:,}"
  )


@quote("docs/lns.md")
def lns_digits_table() -> str:
  rows = []
  for name, flag in (("MLP 64-128-10", ""), ("`--model cnn`", " --model cnn")):
    r = _examples()[f"python -m madam_examples.lns_digits{flag}"]
    rows.append(
      f"| `madam`, float32 weights ({name}) | {r['float_accuracy']:.2f} | "
      f"{r['float_param_bytes']:,} | "
      f"| `lns_madam`, int8 weights ({name}) | {r['lns_accuracy']:.2f} | "
      f"{r['lns_param_bytes']:,} |"
    )
  return "\n".join(rows)


@quote("docs/equinox.md")
def equinox_run() -> str:
  r = _examples()["python -m madam_examples.equinox_mlp"]
  return (
    f"Equinox MLP, Madam lr=0.01, {r['steps']} steps: loss "
    f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}, test accuracy "
    f"{r['test_accuracy']:.2f} %"
  )


@quote("docs/studies.md")
def demo_compare() -> str:
  record = _examples()["madam-demo --compare"]["record"]
  parts = [
    f"{r['optimizer'].capitalize()}@{r['lr']:g} {r['final']:.2f} %"
    for r in record["results"]
  ]
  return (
    f"With `madam-demo --compare` (MLP, {record['steps']} steps) the committed "
    f"run printed {' and '.join(parts)} held-out accuracy"
  )


@quote("README.md")
def factored_int8_cost() -> str:
  """int8 codes with a factored second moment against float Madam."""
  res = results("factored_accuracy")["results"]
  points, ratio = [], []
  for r in res.values():
    madam, lns = r["configs"]["madam"], r["configs"]["lns int8 factored"]
    if r["metric"] == "accuracy":
      points.append(madam["mean"] - lns["mean"])
    else:
      ratio.append(lns["mean"] / madam["mean"] - 1)
  seeds = len(results("factored_accuracy")["settings"]["seeds"])
  return (
    f"cost at most {max(points):.2f} accuracy points or "
    f"{100 * max(ratio):.1f} % perplexity against float Madam ({seeds} seeds)"
  )


# ------------------------------------------------------ sharded, speed


@quote("README.md")
def multiprocess_loss() -> str:
  rows = results("multiprocess_cpu")["rows"]
  assert all(not r["collectives_optimizer_update"] for r in rows)
  losses = {f"{r['final_valid_loss']:.6f}" for r in rows}
  assert len(losses) == 1, losses
  procs = sorted({r["processes"] for r in rows})
  return (
    f"{', '.join(map(str, procs[:-1]))} and {procs[-1]} processes end at the "
    f"same validation loss, {losses.pop()}"
  )


@quote("docs/distributed.md")
def multiprocess_table() -> str:
  lines = [
    "| processes x devices | params + optimizer state / device (KiB) | "
    "train step ms, median | collectives in the train step | collectives in "
    "the optimizer update | final valid loss |",
    "|---|---|---|---|---|---|",
  ]
  for r in results("multiprocess_cpu")["rows"]:
    kib = (r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]) / 1024
    train = ", ".join(r["collectives_train_step"]) or "none"
    update = ", ".join(r["collectives_optimizer_update"]) or "none"
    lines.append(
      f"| {r['processes']} x {r['devices_per_process']} | {kib:.1f} | "
      f"{r['step_time_ms']['median']:.1f} | {train} | {update} | "
      f"{r['final_valid_loss']:.6f} |"
    )
  n = results("multiprocess_cpu")["rows"][0]["parameters"]
  return f"{n:,} parameters", "\n".join(lines)


@quote("docs/distributed.md")
def scaling_table() -> str:
  lines = [
    "| devices | layout | params / device (KiB) | optimizer state / device "
    "(KiB) | collectives in the optimizer update |",
    "|---|---|---|---|---|",
  ]
  for r in results("scaling_cpu")["rows"]:
    n = r["devices"]
    if n == 1:
      layout = "-"
    elif r["layout"] == "fsdp":
      layout = f"fsdp={n}"
    elif n == 8:
      layout = f"data={n} (replicated)"
    else:  # the page shows one replicated layout, the largest
      continue
    update = ", ".join(r["collectives_optimizer_update"]) or "none"
    lines.append(
      f"| {n} | {layout} | {r['param_bytes_per_device'] / 1024:.1f} | "
      f"{r['opt_state_bytes_per_device'] / 1024:.1f} | {update} |"
    )
  n = results("scaling_cpu")["rows"][0]["parameters"]
  return f"{n:,} parameters", "\n".join(lines)


MODEL_TREES = ("mlp", "resnet50", "gpt2_small")


def _span(values) -> str:
  return f"{min(values):.2f}-{max(values):.2f}x"


@quote("README.md", "docs/performance.md")
def madam_over_adam() -> str:
  committed = [_step_row(t, "madam")["x_adam_paired"] for t in MODEL_TREES]
  stems = ("step_time_cpu", "step_time_levers_cpu", "step_time_floor_cpu")
  every = [
    _step_row(t, "madam", s)["x_adam_paired"]
    for s in stems
    for t in MODEL_TREES
  ]
  lns = [_step_row(t, "lns_madam")["x_adam_paired"] for t in MODEL_TREES]
  return (
    f"Madam's step is {_span(committed)} Adam's on the model-shaped trees in "
    f"the committed run ({_span(every)} over the {len(stems)} committed runs), "
    f"`lns_madam`'s on int8 codes {_span(lns)}"
  )


@quote("README.md")
def ratio_drift() -> str:
  """How far one tree's madam / adam moved between the committed runs."""
  stems = ("step_time_cpu", "step_time_levers_cpu", "step_time_floor_cpu")
  trees = [t["tree"] for t in results(stems[1])["trees"]]
  moves = [
    np.ptp([_step_row(t, "madam", s)["x_adam_paired"] for s in stems])
    for t in trees
  ]
  return f"Ratios move by up to {max(moves):.1f} between runs"


@quote("README.md")
def bytes_moved() -> str:
  madam = _step_row("mlp", "madam")["bytes_per_param_moved"]
  adam = _step_row("mlp", "adam")["bytes_per_param_moved"]
  return f"Madam needs to move {madam:g} bytes per parameter to Adam's {adam:g}"


# -------------------------------------------------------------- the test


# ---------------------------------------------- docs/performance.md's figures

BIG_TREES = ("mlp", "resnet50", "gpt2_small", "flat_10M", "flat_100M")
TREE_NAMES = {
  "mlp": "MLP",
  "resnet50": "ResNet-50",
  "gpt2_small": "GPT-2 small",
  "flat_1M": "flat 1M",
  "flat_10M": "flat 10M",
  "flat_100M": "flat 100M",
}
STEP_RUNS = ("step_time_cpu", "step_time_levers_cpu", "step_time_floor_cpu")


def _x(tree: str, optimizer: str, key: str = "x_adam_paired", stem=None):
  return _step_row(tree, optimizer, stem or "step_time_cpu")[key]


def _range(values, fmt: str = ".2f") -> str:
  return f"{min(values):{fmt}}-{max(values):{fmt}}"


def _miss(ratio: float, bound: float) -> str:
  return f"{100 * (ratio / bound - 1):.0f} %"


@quote("docs/performance.md")
def performance_table() -> str:
  lines = [
    "| tree | madam / adam step | madam / floor | adam / floor | madam / adam "
    "compile | madam chain / adam | lns_madam / adam | lns_madam / nearest "
    "| lns_madam nearest / adam | bf16 state / adam |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for tree in results("step_time_cpu")["trees"]:
    t = tree["tree"]
    leaves = f"{tree['leaves']} " + ("leaves" if tree["leaves"] > 1 else "leaf")
    cells = [
      _x(t, "madam"),
      _x(t, "madam", "x_floor"),
      _x(t, "adam", "x_floor"),
      _x(t, "madam", "x_adam_compile_paired"),
      _x(t, "madam_chain"),
      _x(t, "lns_madam"),
      _x(t, "lns_madam", "x_nearest_paired"),
      _x(t, "lns_madam_nearest"),
      _x(t, "madam_bf16"),
    ]
    lines.append(
      f"| {TREE_NAMES[t]}, {tree['params'] / 1e6:.1f}M params, {leaves} | "
      + " | ".join(f"{c:.2f}" for c in cells)
      + " |"
    )
  return "\n".join(lines)


@quote("docs/performance.md")
def performance_runs() -> str:
  trees = [t["tree"] for t in results("step_time_levers_cpu")["trees"]]
  later = STEP_RUNS[1:]

  def pair(t):
    return " and ".join(f"{_x(t, 'madam', stem=s):.2f}" for s in later)

  each = [f"{pair(t)} ({TREE_NAMES[t]})" for t in trees]
  spans = [_range([_x(t, "madam", stem=s) for s in STEP_RUNS]) for t in trees]
  return (
    f"gave madam / adam {', '.join(each[:-1])}, {each[-1]}; over the three "
    f"runs: {', '.join(spans[:-1])} and {spans[-1]}."
  )


@quote("docs/performance.md")
def performance_goals_table() -> str:
  rows = [
    "| goal | tree | ratio | bound | met | miss |",
    "|---|---|---|---|---|---|",
  ]
  bounds = {"madam": 0.8, "lns_madam": 1.0, "nearest": 1.25, "compile": 1.2}
  for tree in results("step_time_cpu")["trees"]:
    t = tree["tree"]
    if tree["params"] < 10_000_000:
      continue
    goals = [
      ("madam / adam", _x(t, "madam"), bounds["madam"]),
      ("lns_madam / adam", _x(t, "lns_madam"), bounds["lns_madam"]),
      (
        "lns_madam / nearest",
        _x(t, "lns_madam", "x_nearest_paired"),
        bounds["nearest"],
      ),
    ]
    if tree["leaves"] >= 100:
      goals.append(
        (
          "compile madam / adam",
          _x(t, "madam", "x_adam_compile_paired"),
          bounds["compile"],
        )
      )
    for goal, ratio, bound in goals:
      met = ratio <= bound
      miss = "-" if met else f"+{100 * (ratio / bound - 1):.0f}%"
      rows.append(
        f"| {goal} | {t} | {ratio:.2f} | <= {bound:g} | "
        f"{'yes' if met else 'no'} | {miss} |"
      )
  return "\n".join(rows)


@quote("docs/performance.md")
def performance_lns_goals() -> str:
  met = ("mlp", "resnet50", "gpt2_small", "flat_10M")
  lns = [_x(t, "lns_madam") for t in met]
  big = _x("flat_100M", "lns_madam")
  threefry = [
    _x(t, "lns_madam_threefry", "step_ms") / _x(t, "lns_madam", "step_ms")
    for t in BIG_TREES
  ]
  threefry_cpu = [
    _x(t, "lns_madam_threefry", "x_adam_paired_cpu") for t in BIG_TREES
  ]
  near = [_x(t, "lns_madam", "x_nearest_paired") for t in BIG_TREES]
  return (
    f"10M ({_range(lns)}), missed by {_miss(big, 1.0)} on flat 100M "
    f"({big:.2f}). Hashed random bits make stochastic rounding "
    f"{_range(threefry, '.1f')}x cheaper than threefry on these trees "
    f'(`rng="threefry"`: {_range(threefry_cpu, ".1f")}x Adam in CPU time). '
    f"* **`lns_madam / nearest`: met** on the MLP, ResNet-50 and GPT-2 small "
    f"({_range(near[:3])}), missed on the flat trees: by "
    f"{_miss(near[3], 1.25)} on flat 10M ({near[3]:.2f}) and by "
    f"{_miss(near[4], 1.25)} on flat 100M ({near[4]:.2f})."
  )


@quote("docs/performance.md")
def performance_madam_goal() -> str:
  model = [_x(t, "madam") for t in MODEL_TREES]
  flat10, flat100 = _x("flat_10M", "madam"), _x("flat_100M", "madam")
  flats = [_x(t, "madam", stem=s) for s in STEP_RUNS for t in BIG_TREES[3:]]
  misses = [100 * (r / 0.8 - 1) for r in model]
  floor_madam = [_x(t, "madam", "x_floor") for t in BIG_TREES]
  floor_adam = [_x(t, "adam", "x_floor") for t in BIG_TREES]
  return (
    f"missed**, by {min(misses):.0f}-{max(misses):.0f} % on the model trees, "
    f"by {_miss(flat10, 0.8)} on flat 10M ({flat10:.2f}) and by "
    f"{_miss(flat100, 0.8)} on flat 100M ({flat100:.2f}), the two flat trees "
    f"spanning {_range(flats)} over three runs."
  ), (
    f"Madam runs at {_range(floor_madam, '.1f')}x its bandwidth floor, Adam "
    f"at {_range(floor_adam, '.1f')}x."
  )


@quote("docs/performance.md")
def performance_floor() -> str:
  stem = "step_time_floor_cpu"
  trees = [t["tree"] for t in results(stem)["trees"]]
  rms = [_x(t, "rmsprop", stem=stem) for t in trees]
  madam = [_x(t, "madam", stem=stem) for t in trees]
  named = [f"{r:.2f} ({TREE_NAMES[t]})" for r, t in zip(rms, trees)]
  over = [
    _x(t, "madam", "step_ms", stem) / _x(t, "rmsprop", "step_ms", stem)
    for t in trees
    if t != "flat_100M"
  ]
  room = [100 * (0.8 / r - 1) for r in rms]
  return (
    f"RMSprop / Adam: {', '.join(named)}; Madam / Adam in the same run "
    f"{', '.join(f'{m:.2f}' for m in madam[:-1])} and {madam[-1]:.2f}. So "
    "with two loops per tensor, Madam's bytes alone take "
    f"{_range(rms)} of Adam's step here, and 0.80 would leave Madam's whole "
    "step (the division, clip, `expm1`, exact bound and landing, and the NaN "
    f"and zero cases) {min(room):.0f}-{max(room):.0f} % above a step that "
    f"does almost nothing; it takes {100 * (min(over) - 1):.0f}-"
    f"{100 * (max(over) - 1):.0f} % (Madam / RMSprop {_range(over)} on the "
    "model trees and flat 10M)."
  )


@quote("docs/performance.md")
def performance_compile() -> str:
  many = ("resnet50", "gpt2_small")
  ratios = [_x(t, "madam", "x_adam_compile_paired") for t in many]
  chain = [
    _x(t, "madam_chain", "x_adam_compile_paired", "step_time_levers_cpu")
    for t in many
  ]
  misses = [100 * (r / 1.2 - 1) for r in ratios]
  return (
    f"missed** by {min(misses):.0f}-{max(misses):.0f} % ({ratios[0]:.2f} on "
    f"ResNet-50, {ratios[1]:.2f} on GPT-2 small; the chain of parts: "
    f"{_range(chain, '.1f')} in the lever run)."
  )


@quote("docs/performance.md")
def performance_magnitude_lever() -> str:
  stem = "step_time_levers_cpu"
  pairs = [
    f"{TREE_NAMES[t['tree']]} "
    f"{_x(t['tree'], 'madam_parts_bound', stem=stem):.2f} -> "
    f"{_x(t['tree'], 'madam', stem=stem):.2f}"
    for t in results(stem)["trees"]
  ]
  return (
    "measured side by side (`madam_parts_bound`, `step_time_levers_cpu.md`): "
    + ", ".join(pairs)
  )


@quote("docs/performance.md")
def performance_holds() -> str:
  state = _x("mlp", "madam", "state_full_bytes_per_param")
  bf16 = _x("mlp", "madam_bf16", "state_full_bytes_per_param")
  adam = _x("mlp", "adam", "state_full_bytes_per_param")
  trees = [t["tree"] for t in results("step_time_cpu")["trees"]]
  fused = [_x(t, "madam_chain") / _x(t, "madam") for t in trees]
  chain = [_x(t, "madam_chain") for t in trees]
  bf16_step = [_x(t, "madam_bf16") for t in BIG_TREES]
  near = [_x(t, "lns_madam_nearest") for t in BIG_TREES]
  return (
    (
      f"{state:.2f} bytes per parameter in float32 and {bf16:.2f} with "
      f"`state_dtype=jnp.bfloat16` (Adam: {adam:.2f})"
    ),
    (f"{_range(fused)}x faster (chain / adam {_range(chain)})"),
    (
      f"at {_range(bf16_step)}x Adam's step on the 10M+ trees "
      f"({_x('flat_1M', 'madam_bf16'):.2f} on flat 1M)"
    ),
    f"is {_range(near)}x Adam on the 10M+ trees.",
  )


# ------------------------------------------------- the first moment (b1)


@quote("docs/maths.md")
def first_moment_step_time() -> str:
  trees = [t["tree"] for t in results("step_time_b1_cpu")["trees"]]

  def ratios(optimizer):
    return [
      _step_row(t, optimizer, "step_time_b1_cpu")["x_adam_paired"]
      for t in trees
    ]

  def span(values):
    return f"{min(values):.2f}-{max(values):.2f}"

  return (
    f"`madam(b1=0.9)` took {span(ratios('madam_b1'))} times `optax.adam`'s "
    "step on the MLP, ResNet-50 and GPT-2-small trees and a flat 10M tree, "
    f"and `madam()` {span(ratios('madam'))} times"
  )


def _first_moment_bytes(config: str) -> str:
  rows = results("lns_first_moment_memory")["memory"]["rows"]
  return f"{_find(rows, config=config)['bytes_per_param']:.3f}"


@quote("docs/maths.md")
def first_moment_lns_bytes() -> str:
  b = _first_moment_bytes
  return (
    "int8 codes with a float32 second moment take "
    f"{b('int8 codes + fp32 v, no mu')} bytes per parameter (weights and "
    f"whole state) without a first moment, {b('int8 codes + fp32 v + fp32 mu')}"
    f" with a float32 one and {b('int8 codes + fp32 v + bf16 mu')} with a "
    "bfloat16 one (`mu_dtype=jnp.bfloat16`); bfloat16 second and first "
    f"moments together take {b('int8 codes + bf16 v + bf16 mu')}."
  )


@quote("docs/maths.md")
def first_moment_lns_training() -> str:
  data = results("lns_first_moment_training")
  runs: dict[str, dict[int, float]] = {}
  for row in data["training"]:
    runs.setdefault(row["variant"], {})[row["seed"]] = row["perplexity"]
  mean = {k: float(np.mean(list(v.values()))) for k, v in runs.items()}
  fp32, bf16 = runs["fp32 mu"], runs["bf16 mu"]
  worst = max(abs(fp32[s] - bf16[s]) for s in fp32)
  # The page rounds the largest per-seed difference up to two decimals.
  within = math.ceil(worst * 100) / 100
  int8_bytes = _first_moment_bytes("int8 codes + fp32 v + int8 mu")
  steps, lr = data["training_config"]["steps"], data["training_config"]["lr"]
  both = f"{mean['fp32 mu']:.3f}"
  if f"{mean['bf16 mu']:.3f}" != both:  # then the page's "for both" is wrong
    both = f"{mean['fp32 mu']:.3f} and {mean['bf16 mu']:.3f}"
  return (
    f"(int8 codes, {steps} steps at rate {lr:g}, three seeds) a bfloat16 "
    f"first moment ended within {within:.2f} validation perplexity of a "
    f"float32 one on every seed ({both} on average for both), so `mu_dtype=jnp.bfloat16` is the one to use with LNS codes. An "
    "int8 first moment (a fixed-point code of `m_hat / sqrt(v_hat)`, "
    f"{int8_bytes} bytes per parameter) also trained as well in that study, "
    "but is not a library option yet. In those short runs the first moment "
    f"itself did not help the LNS model: {mean['fp32 mu']:.3f} against "
    f"{mean['no mu (b1=0)']:.3f} without it."
  )


def _params():
  return [
    pytest.param(fn, page, id=f"{fn.__name__}-{page}")
    for fn, pages in QUOTES
    for page in pages
  ]


@pytest.mark.parametrize("fn, page", _params())
def test_page_quotes_the_committed_result(fn, page):
  expected = fn()
  # A quote is one text, or a tuple of texts that the page holds apart.
  for text in expected if isinstance(expected, tuple) else (expected,):
    assert _squash(text) in _squash(page_text(page)), (
      f"{page} must say, as computed by {fn.__name__} from "
      f"benchmarks/results/: {text!r}"
    )


def test_every_quote_reads_a_committed_file():
  """Each function above reads at least one results file (no typed number)."""
  for fn, pages in QUOTES:
    results.cache_clear()
    fn()
    assert results.cache_info().currsize >= 1, fn.__name__
    assert pages and all((ROOT / p).exists() for p in pages), fn.__name__


def test_rates_join():
  assert _rates([0.1, 0.01]) == "0.01 or 0.1"
  assert math.isclose(float(_rate(1e-4)), 1e-4)


# ------------------------------------------ the Transformer recipe (studies)
# docs/studies.md's "The Transformer recipe": every figure of the section is
# rebuilt here from lr_sweep.json (its recipe cells, tries and the additive
# rate check) and lns_recipe.json. These quotes have their own test below.

_RECIPE_QUOTES_START = len(QUOTES)
_RECIPE_ARMS = ("madam", "recipe", "recipe_b1")
_RECIPE_NAMES = {
  "madam": "Madam (zero leaves to Adam)",
  "recipe": "recipe",
  "recipe_b1": "recipe, b1 0.9",
}
_TASK_NAMES = {
  "mlp": "MLP (accuracy %)",
  "cnn": "CNN (accuracy %)",
  "transformer": "Transformer (perplexity)",
  "gan": "GAN (Fréchet distance)",
}


def _cell(key: str) -> dict | None:
  return results("lr_sweep")["cells"].get(key)


def _transformer_key(budget: int, optimizer: str) -> str:
  p = "/p2" if optimizer in _RECIPE_ARMS else ""
  return f"transformer/x{budget}/step/{optimizer}{p}"


def _best_mean(values) -> tuple[float, float]:
  """Lowest mean over seeds (perplexity) and its rate."""
  lr_sweep = _benchmark("lr_sweep")
  means = np.mean(np.asarray(values, np.float64), axis=1)
  i = int(np.nanargmin(means))
  return float(means[i]), lr_sweep.LEARNING_RATES[i]


def _gap(ppl: float, budget: int) -> float:
  """Per cent above the best-tuned Adam's perplexity at ``budget``."""
  adam, _ = _best_mean(_cell(_transformer_key(budget, "adam"))["values"])
  return 100 * (ppl / adam - 1)


def _arm_gap(budget: int, arm: str) -> float:
  """An arm's best perplexity at ``budget``, per cent above the best Adam's."""
  ppl, _ = _best_mean(_cell(_transformer_key(budget, arm))["values"])
  return _gap(ppl, budget)


def _steps(*budgets: int) -> list[int]:
  """The Transformer's steps at each budget."""
  return [_cell(_transformer_key(b, "adam"))["steps"] for b in budgets]


def _ppl_gap(ppl: float, budget: int) -> str:
  return f"{ppl:.2f} ({_gap(ppl, budget):+.1f} %)"


def _budget_label(budget: int) -> str:
  steps = _cell(_transformer_key(budget, "adam"))["steps"]
  return f"x{budget} ({steps:,} steps)"


@quote("docs/studies.md")
def recipe_additive_rate_table() -> str:
  """The check that chose the additive leaves' Adam rate (x4)."""
  grid = results("lr_sweep")["additive_rate_check"]["grid"]
  adam_rates = sorted({float(k.split("/")[1]) for k in grid})
  madam_rates = sorted({float(k.split("/")[0]) for k in grid}, reverse=True)
  head = " | ".join(
    (f"Adam {_rate(a)}" if i == 0 else _rate(a))
    for i, a in enumerate(adam_rates)
  )
  lines = [f"| Madam's rate | {head} |", "|---" * (len(adam_rates) + 1) + "|"]
  for m in madam_rates:
    means = [np.mean(grid[f"{_rate(m)}/{_rate(a)}"]) for a in adam_rates]
    best = int(np.argmin(means))
    cells = [
      f"**{v:.2f}**" if i == best else f"{v:.2f}" for i, v in enumerate(means)
    ]
    lines.append(f"| {_rate(m)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


@quote("docs/studies.md")
def recipe_transformer_table() -> str:
  """Best perplexity (and rate) of each arm by budget, gap to Adam's best."""
  lines = [
    "| budget | best Adam | Madam (zero leaves to Adam) | recipe "
    "| recipe, b1 0.9 |",
    "|---|---|---|---|---|",
  ]
  for budget in (1, 4, 16):
    adam, adam_rate = _best_mean(
      _cell(_transformer_key(budget, "adam"))["values"]
    )
    row = [_budget_label(budget), f"{adam:.2f} at {_rate(adam_rate)}"]
    for arm in _RECIPE_ARMS:
      record = _cell(_transformer_key(budget, arm))
      if record is None:
        row.append("not run")
        continue
      ppl, rate = _best_mean(record["values"])
      row.append(f"{_ppl_gap(ppl, budget)} at {_rate(rate)}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


@quote("docs/studies.md")
def recipe_goal() -> str:
  """Whether the 2 % goal is met at x4 and x16, by arm."""
  gaps = {
    (arm, b): _gap(_best_mean(_cell(_transformer_key(b, arm))["values"])[0], b)
    for arm in ("recipe", "recipe_b1")
    for b in (4, 16)
  }
  met = lambda b: [a for a in ("recipe", "recipe_b1") if gaps[a, b] <= 2]
  x4 = {2: "both arms", 1: "one arm", 0: "neither arm"}[len(met(4))]
  x16 = {2: "both arms", 1: "one arm", 0: "neither arm"}[len(met(16))]
  return (
    f"The goal of 2 % is met at x4 by {x4} and at x16 by {x16} (the miss at "
    f"x16: {gaps['recipe_b1', 16] - 2:.1f} points with the first moment, "
    f"{gaps['recipe', 16] - 2:.1f} without)"
  )


@quote("docs/studies.md")
def recipe_tries_table() -> str:
  """What was tried on the Transformer at x4 and x16, and what each gave."""
  sweep = results("lr_sweep")
  grid = sweep["additive_rate_check"]["grid"]
  (tried,) = [t for k, t in sweep["tries"].items() if "recipe" in k]
  add_lr = float(tried["recipe"]["additive"].split("(")[1].split(")")[0])
  lines = [
    "| what was tried (Madam's best rate of the grid, 3 seeds) | x4 | x16 |",
    "|---|---|---|",
  ]

  def row(name: str, by_budget) -> None:
    cells = []
    for b in (4, 16):
      record = by_budget(b)
      cells.append(
        "not run"
        if record is None
        else _ppl_gap(_best_mean(record["values"])[0], b)
      )
    lines.append(f"| {name} | " + " | ".join(cells) + " |")

  for p in (2, 1, 3):
    row(
      f"Madam on every leaf (zero leaves to Adam), p_scale {p}",
      lambda b, p=p: _cell(f"transformer/x{b}/step/madam/p{p}"),
    )
  madam_lr = max(float(k.split("/")[0]) for k in grid)
  for a in sorted({float(k.split("/")[1]) for k in grid}):
    if a in (_recipe_lr(), add_lr):  # rows of their own below
      continue
    key = f"{_rate(madam_lr)}/{_rate(a)}"
    ppl = float(np.mean(grid[key]))
    lines.append(
      f"| recipe, Adam {_rate(a)} on the other leaves (Madam {_rate(madam_lr)}) "
      f"| {_ppl_gap(ppl, 4)} | not run |"
    )
  row(
    f"recipe, Adam {_rate(add_lr)} on the other leaves (`tries`)",
    lambda b: tried if tried["budget"] == b else None,
  )
  row(
    f"recipe, Adam {_rate(_recipe_lr())} on the other leaves",
    lambda b: _cell(_transformer_key(b, "recipe")),
  )
  row(
    "the same with b1 0.9",
    lambda b: _cell(_transformer_key(b, "recipe_b1")),
  )
  return "\n".join(lines)


def _recipe_lr() -> float:
  """The additive leaves' Adam rate of the recipe cells."""
  text = _cell(_transformer_key(4, "recipe"))["recipe"]["additive"]
  return float(text.split("(")[1].split(")")[0])


@quote("docs/studies.md")
def recipe_gap_by_budget() -> str:
  """The recipe arms' gap to Adam's best, growing with the budget."""
  parts = []
  for arm, name in (("recipe", "the recipe"), ("recipe_b1", "with b1 0.9")):
    gaps = [
      _gap(_best_mean(_cell(_transformer_key(b, arm))["values"])[0], b)
      for b in (1, 4, 16)
    ]
    parts.append(f"{name} " + ", ".join(f"{g:+.1f} %" for g in gaps))
  return "at x1, x4 and x16: " + "; ".join(parts)


@quote("docs/studies.md")
def recipe_other_tasks_table() -> str:
  """Best rate and metric (mean ± std over seeds) of each arm, other tasks."""
  lr_sweep = _benchmark("lr_sweep")
  sweep = results("lr_sweep")
  lines = [
    "| task | budget | Madam | recipe | recipe, b1 0.9 |",
    "|---|---|---|---|---|",
  ]
  for task in ("mlp", "cnn", "gan"):
    p = lr_sweep.default_p_scale(task)
    for budget in (1, 4, 16):
      if _cell(f"{task}/x{budget}/step/madam/p{p:g}") is None:
        continue
      row = [_TASK_NAMES[task], f"x{budget}"]
      for arm in _RECIPE_ARMS:
        record = _cell(f"{task}/x{budget}/step/{arm}/p{p:g}")
        row.append(
          "not run"
          if record is None
          else lr_sweep._mean_at_best(record, sweep["tasks"][task])
        )
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


@quote("docs/studies.md")
def recipe_robustness_table() -> str:
  """Per budget: the rates within noise of the best on every task."""
  lr_sweep = _benchmark("lr_sweep")
  spreads = lr_sweep.spreads(results("lr_sweep"))["across_tasks"]
  by = {
    (s["optimizer"], s["budget"]): s for s in spreads if s["schedule"] == "step"
  }
  lines = [
    "| budget | Madam | recipe | recipe, b1 0.9 |",
    "|---|---|---|---|",
  ]
  for budget in (1, 4, 16):
    row = [f"x{budget}"]
    for arm in _RECIPE_ARMS:
      s = by.get((arm, budget))
      if s is None:
        row.append("not run")
        continue
      order = sorted(s["best"], key=lr_sweep._task_order)
      tasks = ", ".join(order)
      if s["common"]:
        common = ", ".join(_rate(r) for r in s["common"])
        row.append(f"{common} ({tasks})")
      else:
        best = ", ".join(f"{t} {_rate(s['best'][t])}" for t in order)
        row.append(f"none (best: {best})")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


@quote("docs/studies.md")
def recipe_gan_failure() -> str:
  """The GAN under the recipe at Madam's small rates (x4)."""
  lr_sweep = _benchmark("lr_sweep")
  small = [i for i, r in enumerate(lr_sweep.LEARNING_RATES) if r <= 0.01]

  def means(key: str) -> str:
    m = np.mean(np.asarray(_cell(key)["values"]), axis=1)[small]
    return " / ".join(f"{v:.1f}" for v in m)

  rates = " / ".join(_rate(lr_sweep.LEARNING_RATES[i]) for i in small)
  return (
    f"at Madam rates {rates} the recipe's Fréchet distance at x4 is "
    f"{means('gan/x4/step/recipe/p3')}, against "
    f"{means('gan/x4/step/madam/p3')} for Madam; with b1 0.9 the best is "
    f"{_best_mean(_cell('gan/x4/step/recipe_b1/p3')['values'])[0]:.0f}"
  )


@quote("docs/studies.md")
def recipe_int8() -> str:
  """int8 LNS training by the recipe, and its bytes per parameter."""
  lns = results("lns_recipe")
  runs = lns["training"]
  ppl = {k: float(np.mean(v["values"])) for k, v in runs.items()}
  rows = {r["additive"]: r for r in lns["memory"]["rows"]}
  return (
    f"At {lns['steps']} steps with cosine decay (3 seeds): Adam "
    f"({_rate(runs['adam fp32']['learning_rate'])}) "
    f"{ppl['adam fp32']:.2f}, float Madam by the recipe "
    f"({_rate(runs['madam fp32, recipe (Adam)']['learning_rate'])}) "
    f"{ppl['madam fp32, recipe (Adam)']:.2f}, int8 by the recipe "
    f"{ppl['lns int8, recipe (Adam)']:.2f} with Adam on the float leaves and "
    f"{ppl['lns int8, recipe (factored v)']:.2f} with Adafactor's factored "
    f"second moment there. On the GPT-2-small-shaped tree (embeddings "
    f"{100 * rows['adam']['float_share']:.0f} % of the parameters, float32) "
    f"weights plus state come to {rows['adam']['bytes_per_param']:.2f} bytes "
    f"per parameter with Adam on the float leaves, "
    f"{rows['adam_bf16']['bytes_per_param']:.2f} with a bfloat16 first "
    f"moment and {rows['factored']['bytes_per_param']:.2f} with the factored "
    "second moment"
  )


_RECIPE_QUOTES = QUOTES[_RECIPE_QUOTES_START:]


@pytest.mark.parametrize(
  "fn, page",
  [
    pytest.param(fn, page, id=f"{fn.__name__}-{page}")
    for fn, pages in _RECIPE_QUOTES
    for page in pages
  ],
)
def test_studies_page_quotes_the_recipe_results(fn, page):
  expected = fn()
  assert _squash(expected) in _squash(page_text(page)), (
    f"{page} must say, as computed by {fn.__name__} from "
    f"benchmarks/results/: {expected!r}"
  )


if __name__ == "__main__":
  for fn, pages in QUOTES:
    print(f"{fn.__name__} ({', '.join(pages)}):\n{fn()}\n")
