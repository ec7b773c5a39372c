"""The character Transformer trained with int8 weights and a factored second moment.

The examples' Transformer language model (``tasks.build_task("transformer")``)
with its weight tensors stored as 8-bit log-number-system codes and trained
by ``madam_optax.lns_madam(fmt, factored=True)`` through the examples' loop
(``loop.train`` with ``lns_format``): each matrix keeps one second-moment
statistic per row and per column instead of one per weight, so weights plus
optimizer state come to about one byte per parameter for large matrices. The
zero-initialised biases and LayerNorm offsets stay float32 and are trained by
Adam (``madam_optax.with_additive_fallback``). The script prints the
validation perplexity before and after, and the bytes per parameter the
training state holds.

  python -m madam_examples.lns_transformer --steps 400

The model is small (width 32), so its matrices are factored from
``--min-dim-size-to-factor 8`` (Adafactor's default 128 is meant for large
models), and its float biases weigh more than in a large model.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560; Shazeer and
Stern, "Adafactor", arXiv:1804.04235.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import jax

from madam_examples import loop
from madam_examples import memory
from madam_examples import step as step_lib
from madam_examples import tasks
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
QUICK_STEPS = 20


def bytes_per_parameter(state: step_lib.TrainState) -> dict[str, float]:
  """What a training state holds between steps, per model parameter.

  ``weights``: the codes, their float32 scales and the float leaves;
  ``optimizer``: the whole optimizer state (statistics, Adam's moments of the
  float leaves, counts, PRNG key); ``total``: their sum. Bytes are the
  arrays' (``madam_examples.memory.tree_bytes``); ``parameters`` is the
  model's parameter count.
  """
  n = sum(x.size for x in jax.tree.leaves(state.params))
  weights = memory.tree_bytes((state.params, state.max_magnitudes))
  optimizer = memory.tree_bytes(state.opt_state)
  return {
    "parameters": n,
    "weights": weights / n,
    "optimizer": optimizer / n,
    "total": (weights + optimizer) / n,
  }


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m madam_examples.lns_transformer",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--steps", type=positive_int, default=400, help="training steps"
  )
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument(
    "--lr",
    type=float,
    default=0.01,
    help="peak learning rate (cosine decay to 0)",
  )
  parser.add_argument(
    "--min-dim-size-to-factor",
    type=positive_int,
    default=8,
    help="factor the matrices whose two largest "
    "dimensions are at least this large",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"at most {QUICK_STEPS} steps on a short corpus (also MADAM_QUICK=1)",
  )
  args = parser.parse_args(argv)
  if not args.lr > 0:
    parser.error(f"--lr must be positive, got {args.lr}")
  args.quick = args.quick or os.environ.get("MADAM_QUICK") == "1"
  if args.quick:
    args.steps = min(args.steps, QUICK_STEPS)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains, prints the perplexity and bytes per parameter; returns them
  (and the final state under ``"state"``)."""
  args = parse_args(argv)
  task = tasks.build_task("transformer", quick=args.quick)
  before = {}

  def record_start(done, metrics, state):
    if done == 0 and not metrics:  # called once before training
      before.update(
        jax.jit(task.evaluate)(step_lib.weights(state, INT8), task.data)
      )

  state, history = loop.train(
    task,
    "lns_madam",
    args.lr,
    seed=args.seed,
    steps=args.steps,
    eval_every=args.steps,
    lns_format=INT8,
    optimizer_options={
      "factored": True,
      "min_dim_size_to_factor": args.min_dim_size_to_factor,
    },
    callback=record_start,
  )
  held = bytes_per_parameter(state)
  model, scales = state.params["model"], state.max_magnitudes["model"]
  encoded = [
    c
    for c, m in zip(
      jax.tree.leaves(model),
      jax.tree.leaves(scales, is_leaf=lambda x: x is None),
    )
    if m is not None
  ]
  n_codes = sum(c.size for c in encoded)
  code_dtypes = sorted({str(c.dtype) for c in encoded})
  perplexity = float(history["perplexity"][-1])
  print(
    f"{task.description}: {held['parameters']} parameters, "
    f"{args.steps} steps of lns_madam(int8, factored=True)"
  )
  print(
    f"validation perplexity: {float(before['perplexity']):.2f} -> "
    f"{perplexity:.2f}"
  )
  print(
    f"{n_codes} parameters stored as {', '.join(code_dtypes)} codes, "
    f"{held['parameters'] - n_codes} (zero-initialised) in float32"
  )
  print(
    f"bytes per parameter: weights {held['weights']:.3f} + optimizer "
    f"{held['optimizer']:.3f} = {held['total']:.3f} (float32 Adam: 12)"
  )
  return {
    "perplexity_before": float(before["perplexity"]),
    "perplexity": perplexity,
    "bytes_per_parameter": held,
    "code_dtypes": code_dtypes,
    "coded_parameters": n_codes,
    "steps": args.steps,
    "state": state,
  }


if __name__ == "__main__":
  main()
