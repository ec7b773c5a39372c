"""A Flax NNX classifier trained with int8 weights (LNS-Madam), beside float Madam.

The model's weight tensors are encoded once into 8-bit log-number-system
codes and stay ``int8`` from then on: every step decodes them for the forward
pass, takes the gradient with respect to the decoded weights, and
``madam_optax.lns_madam`` updates the codes in the integer domain
(:mod:`madam_examples.step`). The zero-initialised biases stay float, trained
by Adam. Float Madam trains the same model from the same initial weights on
the same batches of scikit-learn's digits.

  python -m madam_examples.lns_digits [--model cnn] [--quick]

Reference: Bernstein et al., arXiv:2006.14560.
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
  add = parser.add_argument
  models_help = "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
  add("--model", choices=sorted(MODELS), default="mlp", help=models_help)
  add(
    "--levels",
    type=_levels,
    default=DEFAULT_LEVELS,
    help="LNS magnitude levels: int8 codes up to 127, int16 above "
    f"(default {DEFAULT_LEVELS})",
  )
  cli.add_run_flags(parser, DEFAULT_STEPS)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  return cli.parse_run_args(build_parser(), argv, DEFAULT_STEPS)


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> dict:
  """Trains float Madam and int8 LNS-Madam from the same initial weights;
  returns the test accuracies, parameter bytes and kernel dtypes seen."""
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
  row = "{:<28}{:>11}{:>13}{:>11}{:>9}".format
  print(row("optimizer", "test acc %", "param bytes", "compile s", "train s"))
  for name, acc, nbytes, h in [
    ("madam (float32 weights)", acc_float, float_bytes, float_history),
    (f"lns_madam ({fmt.dtype} weights)", acc_lns, lns_bytes, lns_history),
  ]:
    seconds = [
      f"{float(h[k]):.1f}" for k in ("compile_seconds", "train_seconds")
    ]
    print(row(name, f"{acc:.2f}", nbytes, *seconds))
  print("(compile: the step and the evaluation; train: compiled steps)")
  seen = ", ".join(sorted(dtypes))
  print(f"weight-matrix dtypes seen during LNS training: {seen}")
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
