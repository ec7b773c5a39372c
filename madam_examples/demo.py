"""``madam-demo``: Madam at its default learning rate against Adam at its own.

Trains one model on real, offline data (scikit-learn's digits by default)
with each chosen optimizer, shows a progress bar, prints a comparison table
and writes a loss/metric plot (PNG) and the numbers (JSON) to ``--out``.

  madam-demo                                  # mlp, Madam@0.01 vs Adam@1e-3
  madam-demo --task cnn                       # a small CNN
  madam-demo --task transformer --steps 300
  madam-demo --task cnn --data cifar-10-batches-py --steps 2000
  madam-demo --optimizer madam,adam,sgd --lr 0.1
  madam-demo --checkpoint-dir ckpt            # resumable; rerun to resume

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from madam_examples import cli

PROG = "madam-demo"
TASK_HELP = {
  "mlp": "MLP on digits (or --data CIFAR-10 folder)",
  "cnn": "small CNN on digits (or --data CIFAR-10)",
  "transformer": "Transformer char LM on stdlib docstrings (or --data text)",
  "gan": "MLP GAN on digits, scored by a Frechet distance",
}


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
      "Train a model on real offline data with Madam at its default "
      "learning rate (0.01) and with Adam at its usual default (1e-3); "
      "print a comparison table and write a loss/metric plot."
    ),
  )
  parser.add_argument(
    "--task",
    default="mlp",
    choices=sorted(TASK_HELP),
    help="; ".join(
      f"{k}: {v}, {tasks.DEFAULT_STEPS[k]} steps" for k, v in TASK_HELP.items()
    )
    + " (default mlp)",
  )
  parser.add_argument(
    "--optimizer",
    dest="optimizers",
    default="madam,adam",
    type=_optimizer_names,
    help="comma-separated optimizers from madam, adam, sgd (momentum 0.9) "
    "(default madam,adam)",
  )
  rates = ", ".join(
    f"{k} {v:g}" for k, v in optimizers.DEFAULT_LEARNING_RATES.items()
  )
  parser.add_argument(
    "--lr",
    type=cli.positive_float,
    default=None,
    help=f"learning rate for every chosen optimizer (default: each one's "
    f"usual rate: {rates})",
  )
  parser.add_argument(
    "--steps",
    type=cli.positive_int,
    default=None,
    help="training steps (default: the task's, see --task; "
    f"{cli.QUICK_STEPS} with --quick)",
  )
  parser.add_argument(
    "--seed",
    type=cli.nonnegative_int,
    default=0,
    help="random seed (default 0)",
  )
  parser.add_argument(
    "--schedule",
    default="constant",
    choices=("constant", "cosine"),
    help="learning-rate schedule for every optimizer: constant (each "
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


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``madam-demo`` console command.

  Bad flags, an ``--out`` that cannot be written and unusable ``--data``
  end it with one line on stderr and exit status 2, before any training.
  """
  args = parse_args(argv)
  import numpy as np  # pylint: disable=import-outside-toplevel
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
  os.makedirs(args.out, exist_ok=True)
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

  def write_json(path):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)

  _write_atomically(numbers, write_json)
  _plot(histories, task, png)
  print(f"\nwrote {png} and {numbers}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
