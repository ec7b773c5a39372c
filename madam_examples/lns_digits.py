"""A Flax NNX classifier trained with int8 weights (LNS-Madam), beside float Madam.

The model's weight tensors are encoded once into 8-bit log-number-system
codes (``madam_optax.lns_encode``) and stay ``int8`` from then on: every
training step decodes them for the forward pass, takes the gradient with
respect to the decoded weights (``madam_optax.lns_value_and_grad``), and
``madam_optax.lns_madam`` updates the codes in the integer domain
(:mod:`madam_examples.step`). The zero-initialised biases stay in float and
are trained additively (``madam_optax.with_additive_fallback``), the
library's recipe for leaves Madam cannot move. Float Madam trains the same
model from the same initial weights on the same batches. Data:
scikit-learn's bundled handwritten digits (no download).

Run it with ``python -m madam_examples.lns_digits`` (``--quick`` or
``MADAM_QUICK=1`` for a 20-step smoke test; ``--model cnn`` for the CNN;
``--help`` for the flags).

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from madam_examples import cli
from madam_examples import data
from madam_examples import loop
from madam_examples import memory
from madam_examples import models
from madam_examples import tasks
import madam_optax

MODELS: dict[str, Callable[[nnx.Rngs], nnx.Module]] = {
  "mlp": lambda rngs: models.MLP(64, (128,), 10, rngs=rngs),
  "cnn": lambda rngs: models.CNN((8, 8, 1), 10, rngs=rngs),
}
DESCRIPTIONS = {"mlp": "MLP 64-128-10", "cnn": "CNN (convs 8-16)"}
BATCH = 64
CHECK_EVERY = 50  # steps between evaluations and dtype checks
DEFAULT_STEPS = 1000
DEFAULT_LEVELS = 127  # the most that int8 codes hold
PROG = "python -m madam_examples.lns_digits"


def digits_task(model: str, steps: int, batch_size: int = BATCH) -> loop.Task:
  """``MODELS[model]`` on the digits, batches of ``batch_size``."""
  return tasks.classification_task(
    model,
    f"{DESCRIPTIONS[model]} on digits",
    data.load_digits(),
    MODELS[model],
    batch_size=batch_size,
    steps=steps,
    eval_every=CHECK_EVERY,
  )


def kernel_dtypes(state: loop.TrainState) -> set[str]:
  """The dtypes of the weight tensors (two or more dimensions) in ``state``."""
  return {str(x.dtype) for x in jax.tree.leaves(state.params) if x.ndim >= 2}


def _levels(text: str) -> int:
  """argparse type: LNS levels that ``LNSFormat.spanning`` accepts."""
  levels = cli.positive_int(text)
  try:
    madam_optax.LNSFormat.spanning(levels)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
  return levels


def build_parser() -> argparse.ArgumentParser:
  """The command line's parser: every flag with its help and default."""
  parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--model",
    choices=sorted(MODELS),
    default="mlp",
    help="; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
    + " (default mlp)",
  )
  parser.add_argument(
    "--steps",
    type=cli.positive_int,
    default=None,
    help=f"training steps of {BATCH} images, for each of the two runs "
    f"(default {DEFAULT_STEPS}; {cli.QUICK_STEPS} with --quick)",
  )
  parser.add_argument(
    "--levels",
    type=_levels,
    default=DEFAULT_LEVELS,
    help="LNS magnitude levels, spanning a ratio e**4 below each tensor's "
    "scale: up to 127 the codes are int8, above (to 32767) int16 "
    f"(default {DEFAULT_LEVELS})",
  )
  parser.add_argument(
    "--seed",
    type=cli.nonnegative_int,
    default=0,
    help="seed of the initial weights, the batches and the stochastic "
    "rounding (default 0)",
  )
  cli.add_quick_flag(parser)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  args.steps = cli.resolve_steps(args, DEFAULT_STEPS)
  return args


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> dict:
  """Trains float Madam and int8 LNS-Madam from the same initial weights.

  Returns the two test accuracies, parameter bytes and the kernel dtypes seen.
  """
  args = parse_args(argv)
  task = digits_task(args.model, args.steps)
  fmt = madam_optax.LNSFormat.spanning(args.levels)
  print(
    f"LNS format: {fmt.levels} levels, base {fmt.base:.4f}, "
    f"{fmt.dtype} codes; {args.model}, {args.steps} steps of {BATCH}"
  )

  float_state, float_history = loop.train(
    task, "madam", 0.01, seed=args.seed, schedule="constant"
  )

  dtypes: set[str] = set()
  lns_state, lns_history = loop.train(
    task,
    "lns_madam",
    0.01,
    seed=args.seed,
    schedule="constant",
    lns_format=fmt,
    optimizer_options={"state_dtype": jnp.bfloat16},
    callback=lambda step, metrics, state: dtypes.update(kernel_dtypes(state)),
  )

  acc_float = float(float_history["accuracy"][-1])
  acc_lns = float(lns_history["accuracy"][-1])
  float_bytes = memory.tree_bytes(float_state.params)
  lns_bytes = memory.tree_bytes(lns_state.params)
  rows = [
    ("madam (float32 weights)", acc_float, float_bytes, float_history),
    (f"lns_madam ({fmt.dtype} weights)", acc_lns, lns_bytes, lns_history),
  ]
  print(
    f"{'optimizer':<28} {'test acc %':>10} {'param bytes':>12} "
    f"{'compile s':>10} {'train s':>8}"
  )
  for name, acc, nbytes, history in rows:
    print(
      f"{name:<28} {acc:>10.2f} {nbytes:>12d} "
      f"{float(history['compile_seconds']):>10.1f} "
      f"{float(history['train_seconds']):>8.1f}"
    )
  print(
    "(compile: compiling the step and the evaluation; train: the steps "
    "and evaluations, compilation excluded)"
  )
  print(
    "weight-matrix dtypes seen during LNS training: "
    f"{', '.join(sorted(dtypes))}"
  )
  return dict(
    float_accuracy=acc_float,
    lns_accuracy=acc_lns,
    float_param_bytes=float_bytes,
    lns_param_bytes=lns_bytes,
    lns_dtypes=sorted(dtypes),
    steps=args.steps,
  )


if __name__ == "__main__":
  main()
