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
``MADAM_QUICK=1`` for a short run; ``--model cnn`` for the CNN).

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import madam_optax
from madam_examples import loop
from madam_examples import memory
from madam_examples import models
from madam_examples import tasks
# The digits, the models and the loss by these names are also what
# benchmarks/lns_bits.py trains.
from madam_examples.data import load_digits
from madam_examples.tasks import cross_entropy  # noqa: F401  pylint: disable=unused-import

MODELS: dict[str, Callable[[nnx.Rngs], nnx.Module]] = {
    "mlp": lambda rngs: models.MLP(64, (128,), 10, rngs=rngs),
    "cnn": lambda rngs: models.CNN((8, 8, 1), 10, rngs=rngs),
}
DESCRIPTIONS = {"mlp": "MLP 64-128-10", "cnn": "CNN (convs 8-16)"}
BATCH = 64
CHECK_EVERY = 50        # steps between evaluations and dtype checks


def digits_task(model: str, steps: int) -> loop.Task:
  """``MODELS[model]`` on the digits, batches of ``BATCH``."""
  return tasks.classification_task(
      model, f"{DESCRIPTIONS[model]} on digits", load_digits(),
      MODELS[model], batch_size=BATCH, steps=steps, eval_every=CHECK_EVERY)


def kernel_dtypes(state: loop.TrainState) -> set[str]:
  """The dtypes of the weight tensors (two or more dimensions) in ``state``."""
  return {str(x.dtype) for x in jax.tree.leaves(state.params) if x.ndim >= 2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--levels", type=int, default=127,
                      help="LNS levels (<= 127: int8 codes)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="a short run (also MADAM_QUICK=1)")
  args = parser.parse_args(argv)
  if args.quick or os.environ.get("MADAM_QUICK") == "1":
    args.steps = min(args.steps, 100)
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Trains float Madam and int8 LNS-Madam from the same initial weights.

  Returns the two test accuracies, parameter bytes and the kernel dtypes seen.
  """
  args = parse_args(argv)
  task = digits_task(args.model, args.steps)
  fmt = madam_optax.LNSFormat.spanning(args.levels)
  print(f"LNS format: {fmt.levels} levels, base {fmt.base:.4f}, "
        f"{fmt.dtype} codes; {args.model}, {args.steps} steps of {BATCH}")

  t0 = time.perf_counter()
  float_state, float_history = loop.train(
      task, "madam", 0.01, seed=args.seed, schedule="constant")
  t_float = time.perf_counter() - t0

  dtypes: set[str] = set()
  t0 = time.perf_counter()
  lns_state, lns_history = loop.train(
      task, "lns_madam", 0.01, seed=args.seed, schedule="constant",
      lns_format=fmt, optimizer_options={"state_dtype": jnp.bfloat16},
      callback=lambda step, metrics, state: dtypes.update(
          kernel_dtypes(state)))
  t_lns = time.perf_counter() - t0

  acc_float = float(float_history["accuracy"][-1])
  acc_lns = float(lns_history["accuracy"][-1])
  float_bytes = memory.tree_bytes(float_state.params)
  lns_bytes = memory.tree_bytes(lns_state.params)
  rows = [("madam (float32 weights)", acc_float, float_bytes, t_float),
          (f"lns_madam ({fmt.dtype} weights)", acc_lns, lns_bytes, t_lns)]
  print(f"{'optimizer':<28} {'test acc %':>10} {'param bytes':>12} "
        f"{'time s':>7}")
  for name, acc, nbytes, seconds in rows:
    print(f"{name:<28} {acc:>10.2f} {nbytes:>12d} {seconds:>7.1f}")
  print("weight-matrix dtypes seen during LNS training: "
        f"{', '.join(sorted(dtypes))}")
  return dict(float_accuracy=acc_float, lns_accuracy=acc_lns,
              float_param_bytes=float_bytes, lns_param_bytes=lns_bytes,
              lns_dtypes=sorted(dtypes), steps=args.steps)


if __name__ == "__main__":
  main()
