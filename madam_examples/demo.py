"""``madam-demo``: the paper's claim on screen, one learning rate for all.

With no arguments it trains an MLP on scikit-learn's digits (offline) with
Madam, Adam and SGD with momentum at nine learning rates over four decades,
three seeds each (each optimizer's runs one ``jax.vmap``-ed program), prints
held-out accuracy and training loss against the rate and the spread of each
optimizer's good rates in decades, and writes a plot and the numbers to
``--out``. ``--compare`` trains one run per optimizer on any task instead.

  madam-demo                                  # the sweep (about a minute)
  madam-demo --compare --task cnn             # Madam@0.01 vs Adam@1e-3
  madam-demo --compare --checkpoint-dir ckpt  # resumable; rerun to resume

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from madam_examples import checkpointing
from madam_examples import cli
from madam_examples import data
from madam_examples import loop
from madam_examples import optimizers
from madam_examples import sweep
from madam_examples import tasks

PROG = "madam-demo"
TASK_HELP = {
  "mlp": "MLP on digits (or --data CIFAR-10 folder)",
  "cnn": "small CNN on digits (or --data CIFAR-10)",
  "transformer": "Transformer char LM on stdlib docstrings (or --data text)",
}
# The sweep: arXiv:2006.14560's Figure 1 on the digits MLP, nine rates half
# a decade apart from 1e-4 to 1, each decayed to 0 by a cosine schedule.
RATES = tuple(10.0 ** (k / 2) for k in range(-8, 1))
SWEEP_STEPS = 300
GOOD_WITHIN_POINTS = 1.0  # "good": within 1 point of the best mean accuracy
LABELS = {"madam": "Madam", "adam": "Adam", "sgd": "SGD (momentum 0.9)"}
ADVICE = (
  "Which rate? Madam's default, 0.01, is the paper's; for runs of up to "
  "about 10,000 steps, with a decaying schedule, start at 0.1 and try 0.01 "
  "next (README: Which learning rate?)."
)
# The flags only --compare reads: giving any of them implies --compare.
COMPARE = ("task", "optimizers", "lr", "schedule", "data", "checkpoint_dir")


def _optimizer_names(text: str) -> list[str]:
  names = [o.strip() for o in text.split(",")]
  for o in set(names) - set(LABELS):
    choices = ", ".join(LABELS)
    raise argparse.ArgumentTypeError(
      f"unknown optimizer {o!r}; choose from {choices}"
    )
  return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  add = p.add_argument
  add("--compare", action="store_true", help="per-optimizer curves instead")
  add("--seeds", type=cli.positive_int, default=3, help="seeds per rate (3)")
  steps = "; ".join(
    f"{k}: {v}, {tasks.DEFAULT_STEPS[k]} steps" for k, v in TASK_HELP.items()
  )
  add("--task", choices=sorted(TASK_HELP), help=f"{steps} (default mlp)")
  rates = ", ".join(
    f"{k} {v:g}" for k, v in optimizers.DEFAULT_LEARNING_RATES.items()
  )
  add(
    "--optimizer",
    dest="optimizers",
    type=_optimizer_names,
    help="comma-separated (default madam,adam)",
  )
  add("--lr", type=cli.positive_float, help=f"learning rate (default {rates})")
  add("--steps", type=cli.positive_int, help=f"steps (sweep: {SWEEP_STEPS})")
  add("--seed", type=cli.nonnegative_int, default=0, help="the first seed")
  add("--schedule", choices=("constant", "cosine"), help="(default constant)")
  add("--out", type=cli.output_dir, default="madam-demo-output", help="folder")
  add("--data", help="a CIFAR-10 pickle folder or text file(s) (transformer)")
  add(
    "--max-unknown-fraction",
    type=cli.fraction,
    default=data.MAX_UNKNOWN_FRACTION,
    help="--data text: the most non-ASCII allowed",
  )
  cli.add_quick_flag(p)
  checkpointing.add_arguments(p)
  args = p.parse_args(argv)
  args.quick = cli.quick_requested(args)
  args.compare |= any(getattr(args, k) is not None for k in COMPARE)
  args.task = args.task or "mlp"
  args.optimizers = args.optimizers or ["madam", "adam"]
  args.schedule = args.schedule or "constant"
  return args


def run_name(task: str, optimizer: str, lr: float, seed: int) -> str:
  """The checkpoint subfolder of one run, e.g. ``mlp-madam-lr0.01-seed0``."""
  return f"{task}-{optimizer}-lr{lr:g}-seed{seed}"


def _check_out(folder: str, stem: str) -> None:
  """Opens the output files now, before the first step (root included)."""
  try:
    for ext in (".png", ".json"):
      cli.output_file(os.path.join(folder, stem + ext))
  except argparse.ArgumentTypeError as e:
    raise cli.InputError(
      f"argument --out: cannot write to {folder!r} ({e})"
    ) from None


def _save(folder: str, stem: str, record: dict, fig) -> None:
  """``stem.json`` and ``stem.png``, each written whole, then renamed."""
  path = os.path.join(folder, stem)
  os.makedirs(folder, exist_ok=True)
  with open(path + ".json.tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  fig.savefig(path + ".png.tmp", dpi=100, format="png")
  for ext in (".json", ".png"):
    os.replace(path + ext + ".tmp", path + ext)
  print(f"\nwrote {path}.png and {path}.json")


def _row(label: str, values, fmt: str = ">16.4g") -> str:
  return f"{label:<21}" + "".join(format(v, fmt) for v in values)


def run_sweep(args: argparse.Namespace) -> None:
  """The default job: accuracy and loss against the learning rate."""
  task = tasks.build_task("mlp", quick=args.quick)
  steps = args.steps or (task.steps if args.quick else SWEEP_STEPS)
  seeds = list(range(args.seed, args.seed + args.seeds))
  _check_out(args.out, "sweep")
  print(f"{task.description}; {steps} steps, {len(seeds)} seeds", flush=True)
  results = sweep.sweep(task, LABELS, RATES, seeds, steps)
  print("\n" + _row("held-out accuracy (%)", RATES, ">8.2g"))
  for opt, r in results.items():
    print(_row(LABELS[opt], r["accuracy"].mean(1), ">8.1f"))
  print("final training loss (nats; nan: a seed diverged)")
  for opt, r in results.items():
    print(_row(LABELS[opt], r["train_loss"].mean(1), ">8.2g"))
  summary: dict[str, dict] = {}
  print(f"good rates: within {GOOD_WITHIN_POINTS:g} point of the best mean")
  for opt, r in results.items():
    rate = optimizers.DEFAULT_LEARNING_RATES[opt]
    s = sweep.summarise(RATES, r["accuracy"], rate, GOOD_WITHIN_POINTS)
    print(
      f"{LABELS[opt]:<20} default* {rate:.2g} ({s['accuracy_at_default']:.1f}"
      f" %), best {s['best_rate']:.2g} ({s['best_accuracy']:.1f} %), good "
      f"{min(s['good_rates']):.2g} to {max(s['good_rates']):.2g}: spread "
      f"{s['good_spread_decades']:.1f} decades"
    )
    loss = [
      [v if v == v else None for v in x] for x in r["train_loss"].tolist()
    ]
    r.update(accuracy=r["accuracy"].tolist(), train_loss=loss)
    summary[opt] = {**s, **r}
  print(ADVICE)
  record = {
    "command": " ".join([PROG, *args.argv]),
    "task": task.description,
    "steps": steps,
    "seeds": seeds,
    "schedule": "cosine",
    "learning_rates": list(RATES),
    "good_within_points": GOOD_WITHIN_POINTS,
    "results": summary,
  }
  _save(args.out, "sweep", record, sweep.figure(record, LABELS))


def run_compare(args: argparse.Namespace) -> None:
  """``--compare``: one run per optimizer, its curves over training."""
  task = tasks.build_task(
    args.task,
    data_path=args.data,
    quick=args.quick,
    max_unknown_fraction=args.max_unknown_fraction,
  )
  steps = args.steps or task.steps
  _check_out(args.out, args.task)
  print(f"{task.description}; {steps} steps, {args.schedule} rate", flush=True)
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  rows, histories = [], {}
  for opt in args.optimizers:
    lr = args.lr or optimizers.DEFAULT_LEARNING_RATES[opt]
    label = f"{opt} lr={lr:g}"
    ckpt = args.checkpoint_dir and os.path.join(
      args.checkpoint_dir, run_name(args.task, opt, lr, args.seed)
    )

    def report(done, metrics, _, label=label, ckpt=ckpt):
      if metrics:
        print(f"{label} step {done}: {task.metric} {metrics[task.metric]:.4g}")
      elif done or ckpt:
        print(
          f"{label}: resumed from checkpoint step {done} of {steps} in {ckpt}"
          if done
          else f"{label}: no checkpoint in {ckpt}, starting at step 0"
        )

    _, h = loop.train(
      task,
      opt,
      lr,
      seed=args.seed,
      steps=steps,
      schedule=args.schedule,
      eval_every=max(min(task.eval_every, steps // 2), 1),
      callback=report,
      checkpoint_dir=ckpt,
      checkpoint_every=args.checkpoint_every,
    )
    losses = [k for k in h if k.endswith("_loss") and k != "test_loss"]
    metric = h[task.metric]
    best = np.nanmax(metric) if task.higher_is_better else np.nanmin(metric)
    row = dict(optimizer=opt, lr=lr, final=float(metric[-1]), best=float(best))
    row.update(train_loss=float(h[losses[-1]][-1]))
    row.update(
      {k: float(h.pop(k)) for k in ("compile_seconds", "train_seconds")}
    )
    rows.append({**row, "resumed_from": int(h.pop("resumed_from"))})
    histories[label] = {k: v.tolist() for k, v in h.items()}
    for k in losses:
      axes[0].plot(h["step"], h[k], label=f"{label} {k[:-5]}")
    axes[1].plot(h["step"], metric, ".-", label=label)
  name = task.metric.replace("_", " ")
  axes[0].set(xlabel="step", title="training loss")
  axes[1].set(xlabel="step", title=f"held-out {name}")
  axes[1].set_yscale("log" if task.metric == "perplexity" else "linear")
  axes[0].legend(), axes[1].legend(), fig.suptitle(task.description)
  fig.tight_layout()
  cols = ("lr", f"final {name}", f"best {name}", "train loss", "compile (s)")
  print(
    f"\n{task.description}\n" + _row("optimizer", (*cols, "train (s)"), ">16")
  )
  for r in rows:
    print(_row(r["optimizer"], list(r.values())[1:7]))
  higher = "higher" if task.higher_is_better else "lower"
  print(f"({higher} is better; compile (s): the step and the evaluation)")
  record = {
    "task": task.description,
    "metric": task.metric,
    "steps": steps,
    "seed": args.seed,
    "schedule": args.schedule,
    "results": rows,
    "history": histories,
  }
  _save(args.out, args.task, record, fig)


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  """The ``madam-demo`` command: a bad flag, ``--out`` or ``--data`` ends it
  with one line on stderr and exit status 2, before any training."""
  args = parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  (run_compare if args.compare else run_sweep)(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
