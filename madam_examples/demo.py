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
import time
from typing import Sequence

TASK_HELP = {
    "mlp": "MLP on digits (or --data CIFAR-10 folder)",
    "cnn": "small CNN on digits (or --data CIFAR-10)",
    "transformer": "Transformer char LM on stdlib docstrings (or --data text)",
    "gan": "MLP GAN on digits, scored by a Frechet distance",
}
QUICK_STEPS = 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="madam-demo",
      description=(
          "Train a model on real offline data with Madam at its default "
          "learning rate (0.01) and with Adam at its usual default (1e-3); "
          "print a comparison table and write a loss/metric plot."),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument(
      "--task", default="mlp", choices=sorted(TASK_HELP),
      help="; ".join(f"{k}: {v}" for k, v in TASK_HELP.items()))
  parser.add_argument(
      "--optimizer", default="madam,adam",
      help="comma-separated optimizers from madam, adam, sgd (momentum 0.9)")
  parser.add_argument(
      "--lr", type=float, default=None,
      help="learning rate for every chosen optimizer (default: each one's "
           "usual default: madam 0.01, adam 0.001, sgd 0.1)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps (default: the task's)")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument(
      "--schedule", default="constant", choices=("constant", "cosine"),
      help="learning-rate schedule for every optimizer: constant (each "
           "optimizer exactly at its defaults), or cosine decay from the "
           "learning rate to 0 over the run (as in the lr study)")
  parser.add_argument("--out", default="madam-demo-output",
                      help="output folder for the plot and the numbers")
  parser.add_argument(
      "--data", default=None,
      help="your own data: a CIFAR-10 python-pickle folder (mlp, cnn) or a "
           "text file / folder of .txt files (transformer)")
  parser.add_argument(
      "--quick", action="store_true",
      help=f"{QUICK_STEPS} steps, for a smoke test (also MADAM_QUICK=1)")
  _add_checkpoint_arguments(parser)
  args = parser.parse_args(argv)
  args.optimizers = [o.strip() for o in args.optimizer.split(",") if o.strip()]
  from madam_examples.optimizers import OPTIMIZERS  # pylint: disable=import-outside-toplevel
  for o in args.optimizers:
    if o not in OPTIMIZERS:
      parser.error(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
  if args.lr is not None and not args.lr > 0:
    parser.error(f"--lr must be positive, got {args.lr}")
  if args.checkpoint_dir is not None and args.checkpoint_every < 1:
    parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  if args.quick or os.environ.get("MADAM_QUICK") == "1":
    args.quick = True
  return args


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
  """``--checkpoint-dir``/``--checkpoint-every`` from the checkpointing module."""
  try:
    from madam_examples import checkpointing  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # Orbax missing: say so when the flag is used.
    group = parser.add_argument_group("checkpointing (unavailable)")
    group.add_argument("--checkpoint-dir", default=None,
                       help=f"unavailable here: {e}")
    group.add_argument("--checkpoint-every", type=int, default=100)
    return
  checkpointing.add_arguments(parser)


def run_name(task: str, optimizer: str, lr: float, seed: int) -> str:
  """The checkpoint subfolder of one optimizer run, e.g. ``mlp-madam-lr0.01-seed0``."""
  return f"{task}-{optimizer}-lr{lr:g}-seed{seed}"


def _format_table(rows: list[dict], metric: str, higher_is_better: bool) -> str:
  best = (max if higher_is_better else min)(r["final"] for r in rows)
  head = (f"{'optimizer':<10} {'lr':>8} {'final ' + metric:>22} "
          f"{'best ' + metric:>21} {'train loss':>11} {'time (s)':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    mark = " *" if r["final"] == best else "  "
    lines.append(
        f"{r['optimizer']:<10} {r['lr']:>8g} {r['final']:>20.4g}{mark} "
        f"{r['best']:>21.4g} {r['train_loss']:>11.4g} {r['seconds']:>9.1f}")
  direction = "higher" if higher_is_better else "lower"
  lines.append(f"(* best final {metric}; {direction} is better)")
  return "\n".join(lines)


def _plot(histories: dict, task, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  loss_keys = [k for k in next(iter(histories.values())) if k.endswith("_loss")
               and k != "test_loss"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, h in histories.items():
    for k in loss_keys:
      name = label if len(loss_keys) == 1 else f"{label} {k[:-5]}"
      axes[0].plot(h["step"], h[k], label=name)
    axes[1].plot(h["step"], h[task.metric], label=label, marker=".")
  axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
  axes[1].set(xlabel="step", ylabel=task.metric.replace("_", " "),
              title=f"held-out {task.metric.replace('_', ' ')}")
  if task.metric == "perplexity":
    axes[1].set_yscale("log")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(task.description)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``madam-demo`` console command."""
  args = parse_args(argv)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  from madam_examples import loop  # pylint: disable=import-outside-toplevel
  from madam_examples import optimizers  # pylint: disable=import-outside-toplevel
  from madam_examples import tasks  # pylint: disable=import-outside-toplevel

  print(f"madam-demo: building task {args.task!r} ...", flush=True)
  task = tasks.build_task(args.task, data_path=args.data, quick=args.quick)
  steps = args.steps or (QUICK_STEPS if args.quick else task.steps)
  eval_every = max(min(task.eval_every, steps // 2 or 1), 1)
  print(f"task: {task.description}; {steps} steps ({args.schedule} lr "
        f"schedule), evaluated every {eval_every}", flush=True)

  rows, histories = [], {}
  for opt in args.optimizers:
    lr = (args.lr if args.lr is not None
          else optimizers.DEFAULT_LEARNING_RATES[opt])
    label = f"{opt} lr={lr:g}"
    ckpt_dir = None
    if args.checkpoint_dir is not None:
      ckpt_dir = os.path.join(args.checkpoint_dir,
                              run_name(args.task, opt, lr, args.seed))
    bar = tqdm(total=steps, desc=f"{label:<16}", unit="step",
               file=sys.stdout, dynamic_ncols=True)

    def update(done, metrics, _, bar=bar, label=label, ckpt_dir=ckpt_dir):
      if not metrics:   # before training: the start step
        if done:
          bar.write(f"{label}: resumed from checkpoint step {done} of {steps} "
                    f"in {ckpt_dir}")
        elif ckpt_dir is not None:
          bar.write(f"{label}: no checkpoint in {ckpt_dir}, starting at "
                    "step 0")
        bar.n = bar.last_print_n = done
        bar.refresh()
        return
      bar.set_postfix({task.metric: f"{metrics[task.metric]:.4g}"})
      bar.update(done - bar.n)

    start = time.perf_counter()
    _, history = loop.train(
        task, opt, lr, seed=args.seed, steps=steps, eval_every=eval_every,
        schedule=args.schedule, callback=update, checkpoint_dir=ckpt_dir,
        checkpoint_every=args.checkpoint_every)
    seconds = time.perf_counter() - start
    bar.close()
    resumed = int(history.pop("resumed_from"))
    histories[label] = history
    metric = history[task.metric]
    finite = metric[np.isfinite(metric)]
    best_fn = max if task.higher_is_better else min
    loss_key = [k for k in history if k.endswith("_loss") and k != "test_loss"][-1]
    rows.append({
        "optimizer": opt, "lr": lr, "final": float(metric[-1]),
        "best": float(best_fn(finite)) if len(finite) else float("nan"),
        "train_loss": float(history[loss_key][-1]), "seconds": seconds,
        "resumed_from": resumed})

  print()
  print(task.description)
  print(_format_table(rows, task.metric.replace("_", " "),
                      task.higher_is_better))
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, f"{args.task}.png")
  _plot(histories, task, png)
  with open(os.path.join(args.out, f"{args.task}.json"), "w") as f:
    json.dump({"task": task.description, "metric": task.metric,
               "steps": steps, "seed": args.seed, "schedule": args.schedule,
               "results": rows,
               "history": {k: {m: v.tolist() for m, v in h.items()}
                           for k, h in histories.items()}}, f, indent=1)
  print(f"\nwrote {png} and {os.path.join(args.out, args.task + '.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
