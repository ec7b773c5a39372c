"""``madam-demo``: the paper's claim on screen, one learning rate for all.

With no arguments it trains an MLP on real, offline data (scikit-learn's
digits) with Madam, Adam and SGD with momentum at nine learning rates over
four decades, three seeds each (every rate and seed of an optimizer in one
``jax.vmap``-ed program), prints held-out accuracy and final training loss
against the rate, each optimizer's default rate and the spread of its good
rates in decades, and writes the plot (PNG) and the numbers (JSON) to
``--out``. ``--compare`` trains one run per optimizer at its default rate
instead, on any task, with a progress bar and checkpoints.

  madam-demo                                  # the sweep (about a minute)
  madam-demo --steps 1000 --seeds 5           # a longer sweep
  madam-demo --compare                        # mlp, Madam@0.01 vs Adam@1e-3
  madam-demo --compare --task cnn             # a small CNN
  madam-demo --compare --task transformer --steps 300
  madam-demo --compare --task cnn --data cifar-10-batches-py --steps 2000
  madam-demo --compare --optimizer madam,adam,sgd --lr 0.1
  madam-demo --compare --checkpoint-dir ckpt  # resumable; rerun to resume

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from madam_examples import cli

PROG = "madam-demo"
TASK_HELP = {
  "mlp": "MLP on digits (or --data CIFAR-10 folder)",
  "cnn": "small CNN on digits (or --data CIFAR-10)",
  "transformer": "Transformer char LM on stdlib docstrings (or --data text)",
  "gan": "MLP GAN on digits, scored by a Frechet distance",
}

# The sweep (the default): the claim of arXiv:2006.14560, Figure 1, on the
# digits MLP. Nine rates, half a decade apart, from 1e-4 to 1.
SWEEP_TASK = "mlp"
SWEEP_RATES = tuple(10.0 ** (k / 2) for k in range(-8, 1))
SWEEP_STEPS = 300
SWEEP_SEEDS = 3
SWEEP_EVALS = 4  # the final training loss: the mean over the last quarter
# A rate is "good" when its mean held-out accuracy over the seeds is within
# this many percentage points of the optimizer's best rate's.
GOOD_WITHIN_POINTS = 1.0
SWEEP_SCHEDULE = "cosine"
# The learning-rate story of the README, the docs and the docstrings.
LEARNING_RATE_ADVICE = (
  "Which rate? Madam's default, 0.01, is the paper's; for runs of up to "
  "about 10,000 steps, with a decaying schedule, start at 0.1 and try 0.01 "
  "next (README: Which learning rate?)."
)
LABELS = {"madam": "Madam", "adam": "Adam", "sgd": "SGD (momentum 0.9)"}
# The flags that only --compare reads; giving any of them implies --compare.
COMPARE_FLAGS = (
  "task",
  "optimizers",
  "lr",
  "schedule",
  "data",
  "checkpoint_dir",
)


def _optimizer_names(text: str) -> list[str]:
  """argparse type: comma-separated names from ``optimizers.OPTIMIZERS``."""
  from madam_examples.optimizers import OPTIMIZERS  # pylint: disable=import-outside-toplevel

  names = [o.strip() for o in text.split(",") if o.strip()]
  for o in names:
    if o not in OPTIMIZERS:
      raise argparse.ArgumentTypeError(
        f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}"
      )
  if not names:
    raise argparse.ArgumentTypeError(
      f"name at least one optimizer from {', '.join(OPTIMIZERS)}"
    )
  return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  # Deferred imports: a plain `import madam_examples.demo` loads no JAX.
  from madam_examples import data  # pylint: disable=import-outside-toplevel
  from madam_examples import optimizers  # pylint: disable=import-outside-toplevel
  from madam_examples import tasks  # pylint: disable=import-outside-toplevel

  parser = cli.ArgumentParser(
    prog=PROG,
    description=(
      "Without --compare: train an MLP on scikit-learn's digits with Madam, "
      "Adam and SGD (momentum 0.9) at nine learning rates from 1e-4 to 1, "
      f"{SWEEP_SEEDS} seeds each, and show held-out accuracy and final "
      "training loss against the learning rate (table and plot), with "
      "each optimizer's default rate and the spread of its good rates. "
      "With --compare: train one run per optimizer at its default rate on "
      "a task of your choice and compare them over training."
    ),
  )
  parser.add_argument(
    "--compare",
    action="store_true",
    help="train one run per optimizer (--optimizer) at its default rate "
    "(or --lr) on --task and plot them over training; implied by --task, "
    "--optimizer, --lr, --schedule, --data and --checkpoint-dir",
  )
  parser.add_argument(
    "--seeds",
    type=cli.positive_int,
    default=SWEEP_SEEDS,
    help=f"the sweep: seeds per learning rate (default {SWEEP_SEEDS})",
  )
  parser.add_argument(
    "--task",
    default=None,
    choices=sorted(TASK_HELP),
    help="; ".join(
      f"{k}: {v}, {tasks.DEFAULT_STEPS[k]} steps" for k, v in TASK_HELP.items()
    )
    + " (--compare; default mlp)",
  )
  parser.add_argument(
    "--optimizer",
    dest="optimizers",
    default=None,
    type=_optimizer_names,
    help="--compare: comma-separated optimizers from madam, adam, sgd "
    "(momentum 0.9) (default madam,adam)",
  )
  rates = ", ".join(
    f"{k} {v:g}" for k, v in optimizers.DEFAULT_LEARNING_RATES.items()
  )
  parser.add_argument(
    "--lr",
    type=cli.positive_float,
    default=None,
    help=f"--compare: learning rate for every chosen optimizer (default: "
    f"each one's usual rate: {rates})",
  )
  parser.add_argument(
    "--steps",
    type=cli.positive_int,
    default=None,
    help=f"training steps (default: {SWEEP_STEPS} for the sweep, the "
    f"task's with --compare (see --task); {cli.QUICK_STEPS} with --quick)",
  )
  parser.add_argument(
    "--seed",
    type=cli.nonnegative_int,
    default=0,
    help="random seed; the sweep uses seeds SEED to SEED + SEEDS - 1 "
    "(default 0)",
  )
  parser.add_argument(
    "--schedule",
    default=None,
    choices=("constant", "cosine"),
    help="--compare: learning-rate schedule for every optimizer: constant (each "
    "optimizer exactly at its defaults), or cosine decay from the "
    "learning rate to 0 over the run (as in the lr study) "
    "(default constant)",
  )
  parser.add_argument(
    "--out",
    type=cli.output_dir,
    default="madam-demo-output",
    help="folder for the plot and the numbers, checked before training "
    "and made when they are written (default madam-demo-output)",
  )
  parser.add_argument(
    "--data",
    default=None,
    help="your own data: a CIFAR-10 python-pickle folder (mlp, cnn) or a "
    "text file / folder of .txt files (transformer)",
  )
  parser.add_argument(
    "--max-unknown-fraction",
    type=cli.fraction,
    default=data.MAX_UNKNOWN_FRACTION,
    help="--data text: refuse it when more than this share of its "
    "characters are outside the vocabulary (printable ASCII and "
    "newline; they would train as '?'); 1 accepts any text "
    f"(default {data.MAX_UNKNOWN_FRACTION:g})",
  )
  cli.add_quick_flag(parser)
  _add_checkpoint_arguments(parser)
  args = parser.parse_args(argv)
  if args.checkpoint_dir is not None:
    if args.checkpoint_every < 1:
      parser.error(
        f"argument --checkpoint-every: must be at least 1, got "
        f"{args.checkpoint_every}"
      )
    try:
      cli.output_dir(args.checkpoint_dir)
    except argparse.ArgumentTypeError as e:
      parser.error(f"argument --checkpoint-dir: {e}")
  args.quick = cli.quick_requested(args)
  args.compare = args.compare or any(
    getattr(args, k) is not None for k in COMPARE_FLAGS
  )
  if args.compare:
    args.task = args.task or "mlp"
    args.optimizers = args.optimizers or ["madam", "adam"]
    args.schedule = args.schedule or "constant"
  return args


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
  """``--checkpoint-dir``/``--checkpoint-every`` from the checkpointing module."""
  try:
    from madam_examples import checkpointing  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # Orbax missing: say so when the flag is used.
    group = parser.add_argument_group("checkpointing (unavailable)")
    group.add_argument(
      "--checkpoint-dir", default=None, help=f"unavailable here: {e}"
    )
    group.add_argument("--checkpoint-every", type=int, default=100)
    return
  checkpointing.add_arguments(parser)


def run_name(task: str, optimizer: str, lr: float, seed: int) -> str:
  """The checkpoint subfolder of one optimizer run, e.g. ``mlp-madam-lr0.01-seed0``."""
  return f"{task}-{optimizer}-lr{lr:g}-seed{seed}"


def _format_table(rows: list[dict], metric: str, higher_is_better: bool) -> str:
  best = (max if higher_is_better else min)(r["final"] for r in rows)
  head = (
    f"{'optimizer':<10} {'lr':>8} {'final ' + metric:>22} "
    f"{'best ' + metric:>21} {'train loss':>11} {'compile (s)':>12} "
    f"{'train (s)':>10}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    mark = " *" if r["final"] == best else "  "
    lines.append(
      f"{r['optimizer']:<10} {r['lr']:>8g} {r['final']:>20.4g}{mark} "
      f"{r['best']:>21.4g} {r['train_loss']:>11.4g} "
      f"{r['compile_seconds']:>12.1f} {r['train_seconds']:>10.1f}"
    )
  direction = "higher" if higher_is_better else "lower"
  lines.append(
    f"(* best final {metric}; {direction} is better. compile: "
    "compiling the step and the evaluation; train: the steps and "
    "evaluations, compilation excluded)"
  )
  return "\n".join(lines)


def _write_atomically(path: str, write) -> None:
  """``write(tmp_path)``, then the file renamed to ``path``: never half-written."""
  tmp = f"{path}.tmp"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _plot(histories: dict, task, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  loss_keys = [
    k
    for k in next(iter(histories.values()))
    if k.endswith("_loss") and k != "test_loss"
  ]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, h in histories.items():
    for k in loss_keys:
      name = label if len(loss_keys) == 1 else f"{label} {k[:-5]}"
      axes[0].plot(h["step"], h[k], label=name)
    axes[1].plot(h["step"], h[task.metric], label=label, marker=".")
  axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
  axes[1].set(
    xlabel="step",
    ylabel=task.metric.replace("_", " "),
    title=f"held-out {task.metric.replace('_', ' ')}",
  )
  if task.metric == "perplexity":
    axes[1].set_yscale("log")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(task.description)
  fig.tight_layout()
  _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  plt.close(fig)


def prove_writable(folder: str, names: Sequence[str]) -> None:
  """Makes ``folder`` and opens each output file in it for append, now.

  ``os.access`` says yes to root whatever the permissions, so the outputs
  are proven writable by writing: before the first training step, not
  after the last. Files made here are removed again (the outputs are
  written atomically at the end); the folder stays.

  Raises:
    cli.InputError: naming the path and the reason, for one line on stderr.
  """
  try:
    os.makedirs(folder, exist_ok=True)
    for name in names:
      path = os.path.join(folder, name)
      existed = os.path.exists(path)
      with open(path, "a", encoding="utf-8"):
        pass
      if not existed:
        os.remove(path)
  except OSError as e:
    raise cli.InputError(
      f"argument --out: cannot write to {folder!r} "
      f"({e.strerror or e}); name a folder you can write to"
    ) from None


# ------------------------------------------------------------------ sweep


def good_rates(
  rates: Sequence[float], accuracy: Sequence[float], within: float
) -> list[float]:
  """The rates whose mean accuracy is within ``within`` points of the best.

  Example:
    >>> good_rates([0.1, 0.01, 0.001], [90.0, 97.5, 98.0], 1.0)
    [0.01, 0.001]
  """
  best = max(accuracy)
  return [r for r, a in zip(rates, accuracy) if a >= best - within]


def spread_decades(rates: Sequence[float]) -> float:
  """How far apart the rates lie: ``log10(largest / smallest)``.

  Example:
    >>> spread_decades([0.001, 0.00316, 0.1])
    2.0
  """
  return math.log10(max(rates) / min(rates))


def lower_sweep(
  task, optimizer: str, rates: Sequence[float], seeds: Sequence[int], steps: int
):
  """Every (rate, seed) run of one optimizer as one ``vmap``-ed program.

  Returns:
    ``(lowered, args)``: the traced program (``lowered.compile()`` compiles
    it) and the arguments to call the compiled program with.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from madam_examples import loop  # pylint: disable=import-outside-toplevel

  evals = min(SWEEP_EVALS, steps)
  run = loop.make_run_fn(
    task, optimizer, steps, steps // evals, schedule=SWEEP_SCHEDULE
  )
  # Seed s starts from the same weights and sees the same batches at every
  # rate and with every optimizer.
  key_data = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  keys = jnp.tile(key_data, (len(rates), 1))
  lrs = jnp.repeat(jnp.asarray(rates, jnp.float32), len(seeds))
  fn = jax.jit(
    jax.vmap(
      lambda k, lr, d: run(jax.random.wrap_key_data(k), lr, d),
      in_axes=(0, 0, None),
    )
  )
  args = (keys, lrs, task.data)
  return fn.lower(*args), args


def run_sweep_program(task, compiled, args, shape: tuple[int, int]) -> dict:
  """Runs a compiled :func:`lower_sweep` program; its final numbers.

  Returns:
    ``accuracy`` and ``train_loss`` (arrays ``[rate, seed]``; a run whose
    loss is not finite has diverged and counts as 0 % accuracy),
    ``diverged`` (bools) and ``train_seconds``.
  """
  import jax  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  history = jax.device_get(compiled(*args))
  train_seconds = time.perf_counter() - start
  loss_key = f"{next(iter(task.losses))}_loss"
  loss = np.asarray(history[loss_key][:, -1], np.float64).reshape(shape)
  test_loss = np.asarray(history["test_loss"][:, -1], np.float64)
  diverged = ~(np.isfinite(loss) & np.isfinite(test_loss.reshape(shape)))
  accuracy = np.asarray(history[task.metric][:, -1], np.float64).reshape(shape)
  return {
    "accuracy": np.where(diverged, 0.0, accuracy),
    "train_loss": np.where(diverged, np.nan, loss),
    "diverged": diverged,
    "train_seconds": train_seconds,
  }


def sweep(
  task,
  names: Sequence[str],
  rates: Sequence[float],
  seeds: Sequence[int],
  steps: int,
  report=print,
) -> dict:
  """:func:`lower_sweep` for each optimizer, compiled side by side (XLA
  compiles outside Python's lock), then run one after the other.

  Returns:
    optimizer name -> :func:`run_sweep_program`'s dict, with
    ``compile_seconds`` (the wall time of compiling them all).
  """
  from concurrent import futures  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  lowered = {o: lower_sweep(task, o, rates, seeds, steps) for o in names}
  with futures.ThreadPoolExecutor(len(names)) as pool:
    compiled = dict(
      zip(lowered, pool.map(lambda la: la[0].compile(), lowered.values()))
    )
  compile_seconds = time.perf_counter() - start
  report(
    f"compiled {len(names)} programs of {len(rates) * len(seeds)} runs in "
    f"{compile_seconds:.1f} s"
  )
  results = {}
  for o in names:
    res = run_sweep_program(
      task, compiled[o], lowered[o][1], (len(rates), len(seeds))
    )
    results[o] = {**res, "compile_seconds": compile_seconds}
    report(f"{LABELS[o]:<20} trained in {res['train_seconds']:.1f} s")
  return results


def summarise_sweep(
  rates: Sequence[float], accuracy, default_rate: float
) -> dict:
  """One optimizer's line of the table, from accuracy ``[rate, seed]``."""
  mean = [float(a) for a in accuracy.mean(axis=1)]
  good = good_rates(rates, mean, GOOD_WITHIN_POINTS)
  best = max(range(len(rates)), key=lambda i: mean[i])
  at_default = min(
    range(len(rates)), key=lambda i: abs(rates[i] - default_rate)
  )
  return {
    "default_rate": default_rate,
    "accuracy_at_default": mean[at_default],
    "best_rate": rates[best],
    "best_accuracy": mean[best],
    "good_rates": good,
    "good_spread_decades": spread_decades(good),
    "default_is_good": rates[at_default] in good,
  }


def _rate(r: float) -> str:
  return f"{r:.2g}"


def format_sweep_table(rates, results: dict, summaries: dict) -> str:
  """The accuracy grid and the summary, as printed."""
  width = 8
  head = f"{'held-out accuracy (%)':<22}" + "".join(
    f"{_rate(r):>{width}}" for r in rates
  )
  lines = [head, "-" * len(head)]
  for opt, res in results.items():
    mean = res["accuracy"].mean(axis=1)
    cells = ""
    for r, a in zip(rates, mean):
      mark = "*" if math.isclose(r, summaries[opt]["default_rate"]) else " "
      cells += f"{a:>{width - 1}.1f}{mark}"
    lines.append(f"{LABELS[opt]:<22}{cells}")
  lines.append(
    f"{'final training loss':<22}" + "".join(f"{'':>{width}}" for _ in rates)
  )
  for opt, res in results.items():
    with_nan = res["train_loss"]
    cells = ""
    for row in with_nan:
      cells += (
        f"{'nan':>{width}}"
        if not np.isfinite(row).all()
        else f"{row.mean():>{width}.3f}"
      )
    lines.append(f"{LABELS[opt]:<22}{cells}")
  lines.append(
    "(* each optimizer's default rate; mean over seeds; final training "
    "loss: mean cross-entropy of the last quarter of the steps, nats; "
    "nan: diverged, the loss not finite, in a seed)"
  )
  lines.append("")
  head = (
    f"{'optimizer':<20} {'default':>8} {'acc. there':>10} {'best rate':>9} "
    f"{'best acc.':>9} {'good rates':>15} {'spread':>8}"
  )
  lines += [head, "-" * len(head)]
  for opt, s in summaries.items():
    good = s["good_rates"]
    lines.append(
      f"{LABELS[opt]:<20} {_rate(s['default_rate']):>8} "
      f"{s['accuracy_at_default']:>10.1f} {_rate(s['best_rate']):>9} "
      f"{s['best_accuracy']:>9.1f} "
      f"{_rate(min(good)) + ' - ' + _rate(max(good)):>15} "
      f"{s['good_spread_decades']:>8.1f}"
    )
  lines.append(
    f"(good: mean held-out accuracy within {GOOD_WITHIN_POINTS:g} point of "
    "that optimizer's best; spread: how far apart its good rates lie, in "
    "decades, log10(largest / smallest))"
  )
  return "\n".join(lines)


def sweep_figure(record: dict, plt):
  """The sweep's figure from its JSON ``record`` (see :func:`run_sweep`).

  Left: held-out accuracy against the learning rate (mean of the seeds,
  band from the worst to the best seed), each default starred, each
  optimizer's good rates as a bar; right: the final training loss.
  """
  rates = record["learning_rates"]
  results = {
    opt: {
      "accuracy": np.asarray(r["accuracy"], np.float64),
      "train_loss": np.asarray(
        [[np.nan if v is None else v for v in row] for row in r["train_loss"]],
        np.float64,
      ),
    }
    for opt, r in record["results"].items()
  }
  summaries = record["results"]
  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
  x = np.asarray(rates)
  for i, (opt, res) in enumerate(results.items()):
    color, s = f"C{i}", summaries[opt]
    acc = res["accuracy"]
    label = (
      f"{LABELS[opt]}: good from {_rate(min(s['good_rates']))} to "
      f"{_rate(max(s['good_rates']))} ({s['good_spread_decades']:.1f} decades)"
    )
    acc_ax.plot(x, acc.mean(1), "o-", color=color, label=label)
    acc_ax.fill_between(x, acc.min(1), acc.max(1), color=color, alpha=0.15)
    # The good rates as a bar under the curves, one row per optimizer.
    acc_ax.plot(
      [min(s["good_rates"]), max(s["good_rates"])],
      [4 + 6 * i] * 2,
      color=color,
      lw=6,
      alpha=0.6,
      solid_capstyle="butt",
    )
    d = np.argmin(np.abs(x - s["default_rate"]))
    acc_ax.plot(x[d], acc.mean(1)[d], "*", color=color, ms=18, mec="k")
    loss = res["train_loss"]
    finite = np.isfinite(loss).all(axis=1)
    mean_loss = np.where(finite, np.nanmean(loss, axis=1), np.nan)
    loss_ax.plot(x, mean_loss, "o-", color=color, label=LABELS[opt])
    if finite[d]:
      loss_ax.plot(x[d], mean_loss[d], "*", color=color, ms=18, mec="k")
    if (~finite).any():
      loss_ax.plot(
        x[~finite],
        [1.0] * int((~finite).sum()),
        "x",
        color=color,
        ms=10,
        transform=loss_ax.get_xaxis_transform(),
        clip_on=False,
      )
  acc_ax.plot([], [], "k*", ms=12, ls="", label="default learning rate")
  acc_ax.set(
    xscale="log",
    ylim=(0, 100),
    xlabel="learning rate (log scale)",
    ylabel="held-out test accuracy (%)",
    title="Accuracy after training (bars: the good rates)",
  )
  loss_ax.plot([], [], "kx", ls="", label="diverged (loss not finite)")
  loss_ax.set(
    xscale="log",
    yscale="log",
    xlabel="learning rate (log scale)",
    ylabel="training loss (cross-entropy, nats)",
    title="Final training loss (lower is better)",
  )
  acc_ax.legend(loc="center left", fontsize=8)
  loss_ax.legend(fontsize=8)
  for ax in (acc_ax, loss_ax):
    ax.grid(alpha=0.3, which="both")
  fig.suptitle(
    f"One learning rate for all? {record['task']}, {record['steps']} steps, "
    f"mean of {len(record['seeds'])} seeds (band: worst to best seed)"
  )
  fig.tight_layout()
  return fig


def _plot_sweep(record: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig = sweep_figure(record, plt)
  _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
  plt.close(fig)


def run_sweep(args: argparse.Namespace) -> dict:
  """The default job: accuracy and loss against the learning rate.

  Returns:
    The record written to ``sweep.json``.
  """
  from madam_examples import optimizers  # pylint: disable=import-outside-toplevel
  from madam_examples import tasks  # pylint: disable=import-outside-toplevel

  print(f"madam-demo: building task {SWEEP_TASK!r} ...", flush=True)
  task = tasks.build_task(SWEEP_TASK, quick=args.quick)
  steps = args.steps or (task.steps if args.quick else SWEEP_STEPS)
  seeds = list(range(args.seed, args.seed + args.seeds))
  rates = SWEEP_RATES
  names = ("sweep.png", "sweep.json")
  prove_writable(args.out, names)
  print(
    f"task: {task.description}; {steps} steps of batch 64, cosine decay of "
    f"each rate to 0; {len(rates)} rates x {len(seeds)} seeds per "
    "optimizer, each optimizer one compiled program",
    flush=True,
  )
  results = sweep(
    task,
    optimizers.OPTIMIZERS,
    rates,
    seeds,
    steps,
    report=lambda line: print(line, flush=True),
  )
  summaries = {
    opt: summarise_sweep(
      rates, res["accuracy"], optimizers.DEFAULT_LEARNING_RATES[opt]
    )
    for opt, res in results.items()
  }
  print()
  print(
    f"{task.description}, {steps} steps, {len(seeds)} seeds: held-out "
    "accuracy against the learning rate"
  )
  print(format_sweep_table(rates, results, summaries))
  print(LEARNING_RATE_ADVICE)
  record = {
    "command": " ".join([PROG, *args.argv]),
    "task": task.description,
    "steps": steps,
    "seeds": seeds,
    "schedule": SWEEP_SCHEDULE,
    "learning_rates": list(rates),
    "good_within_points": GOOD_WITHIN_POINTS,
    "results": {
      opt: {
        **summaries[opt],
        "accuracy": res["accuracy"].tolist(),
        "train_loss": [
          [float(v) if np.isfinite(v) else None for v in row]
          for row in res["train_loss"]
        ],
        "compile_seconds": res["compile_seconds"],
        "train_seconds": res["train_seconds"],
      }
      for opt, res in results.items()
    },
  }
  png, numbers = (os.path.join(args.out, n) for n in names)
  _write_json(numbers, record)
  _plot_sweep(record, png)
  print(f"\nwrote {png} and {numbers}")
  return record


def _write_json(path: str, record: dict) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)

  _write_atomically(path, write)


# ---------------------------------------------------------------- compare


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``madam-demo`` console command.

  Bad flags, an ``--out`` that cannot be written and unusable ``--data``
  end it with one line on stderr and exit status 2, before any training.
  """
  args = parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if not args.compare:
    run_sweep(args)
    return 0
  return run_compare(args)


def run_compare(args: argparse.Namespace) -> int:
  """``--compare``: one run per optimizer, over training."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  from madam_examples import loop  # pylint: disable=import-outside-toplevel
  from madam_examples import optimizers  # pylint: disable=import-outside-toplevel
  from madam_examples import tasks  # pylint: disable=import-outside-toplevel

  print(f"madam-demo: building task {args.task!r} ...", flush=True)
  task = tasks.build_task(
    args.task,
    data_path=args.data,
    quick=args.quick,
    max_unknown_fraction=args.max_unknown_fraction,
  )
  steps = args.steps or task.steps
  eval_every = max(min(task.eval_every, steps // 2 or 1), 1)
  prove_writable(args.out, (f"{args.task}.png", f"{args.task}.json"))
  print(
    f"task: {task.description}; {steps} steps ({args.schedule} lr "
    f"schedule), evaluated every {eval_every}",
    flush=True,
  )

  rows, histories = [], {}
  for opt in args.optimizers:
    lr = (
      args.lr if args.lr is not None else optimizers.DEFAULT_LEARNING_RATES[opt]
    )
    label = f"{opt} lr={lr:g}"
    ckpt_dir = None
    if args.checkpoint_dir is not None:
      ckpt_dir = os.path.join(
        args.checkpoint_dir, run_name(args.task, opt, lr, args.seed)
      )
    bar = tqdm(
      total=steps,
      desc=f"{label:<16}",
      unit="step",
      file=sys.stdout,
      dynamic_ncols=True,
    )

    def update(done, metrics, _, bar=bar, label=label, ckpt_dir=ckpt_dir):
      if not metrics:  # before training: the start step
        if done:
          bar.write(
            f"{label}: resumed from checkpoint step {done} of {steps} "
            f"in {ckpt_dir}"
          )
        elif ckpt_dir is not None:
          bar.write(f"{label}: no checkpoint in {ckpt_dir}, starting at step 0")
        bar.n = bar.last_print_n = done
        bar.refresh()
        return
      bar.set_postfix({task.metric: f"{metrics[task.metric]:.4g}"})
      bar.update(done - bar.n)

    _, history = loop.train(
      task,
      opt,
      lr,
      seed=args.seed,
      steps=steps,
      eval_every=eval_every,
      schedule=args.schedule,
      callback=update,
      checkpoint_dir=ckpt_dir,
      checkpoint_every=args.checkpoint_every,
    )
    bar.close()
    resumed = int(history.pop("resumed_from"))
    timings = {
      k: float(history.pop(k)) for k in ("compile_seconds", "train_seconds")
    }
    histories[label] = history
    metric = history[task.metric]
    finite = metric[np.isfinite(metric)]
    best_fn = max if task.higher_is_better else min
    loss_key = [k for k in history if k.endswith("_loss") and k != "test_loss"][
      -1
    ]
    rows.append(
      {
        "optimizer": opt,
        "lr": lr,
        "final": float(metric[-1]),
        "best": float(best_fn(finite)) if len(finite) else float("nan"),
        "train_loss": float(history[loss_key][-1]),
        **timings,
        "resumed_from": resumed,
      }
    )

  print()
  print(task.description)
  print(
    _format_table(rows, task.metric.replace("_", " "), task.higher_is_better)
  )
  png = os.path.join(args.out, f"{args.task}.png")
  numbers = os.path.join(args.out, f"{args.task}.json")
  record = {
    "task": task.description,
    "metric": task.metric,
    "steps": steps,
    "seed": args.seed,
    "schedule": args.schedule,
    "results": rows,
    "history": {
      k: {m: v.tolist() for m, v in h.items()} for k, h in histories.items()
    },
  }

  _write_json(numbers, record)
  _plot(histories, task, png)
  print(f"\nwrote {png} and {numbers}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
