"""The character Transformer trained with int8 weights by the Transformer recipe.

The examples' Transformer language model (``tasks.build_task("transformer")``)
trained by the recipe (``madam_optax.madam_labels``): its hidden weight
matrices are stored as 8-bit log-number-system codes and trained by
``madam_optax.lns_madam(fmt, factored=True)`` (one second-moment statistic
per row and per column); the embeddings, output head, LayerNorms and biases
stay float32 and go to an additive optimizer, because a multiplicative update
never changes a weight's sign. It prints the validation perplexity before and
after, and the bytes per parameter the training state holds.

  python -m madam_examples.lns_transformer --steps 400
  python -m madam_examples.lns_transformer --additive factored

``--additive``: ``adam`` (8 bytes of state per float parameter),
``adam_bf16`` (a bfloat16 first moment: 6 bytes) or ``factored``
(Adafactor's factored second moment, no first moment: about 0 bytes). The
model is small (width 32), so its matrices are factored from 8 rows and
columns (Adafactor's default 128 is meant for large models).

Reference: Bernstein et al., arXiv:2006.14560; Shazeer and Stern,
"Adafactor", arXiv:1804.04235.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from madam_examples import cli
from madam_examples import loop
from madam_examples import memory
from madam_examples import optimizers as optimizers_lib
from madam_examples import step as step_lib
from madam_examples import tasks
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
ADDITIVE: dict[str, Callable[..., optax.GradientTransformation]] = {
  "adam": lambda lr, min_dim: optax.adam(lr),
  "adam_bf16": lambda lr, min_dim: optax.adam(lr, mu_dtype=jnp.bfloat16),
  "factored": lambda lr, min_dim: optax.chain(
    optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim),
    optax.scale_by_learning_rate(lr),
  ),
}


# ``(params, reference, fmt, p_scale=...) -> (codes, max_magnitudes)``: LNS
# codes of the leaves the recipe gives Madam (the hidden weight matrices).
encode_recipe = functools.partial(
  step_lib.encode_lns, labels=madam_optax.madam_labels
)


def recipe_optimizer(
  codes: Any,
  learning_rate: Any,
  *,
  additive: str = "adam",
  additive_learning_rate: Any = madam_optax.ADDITIVE_LEARNING_RATE,
  min_dim_size_to_factor: int = 8,
  seed: Any = 0,
) -> optax.GradientTransformation:
  """``lns_madam(int8, factored=True)`` on the codes, ``additive`` on the
  rest; ``codes`` (concrete, from :func:`encode_recipe`) labels the leaves."""
  return madam_optax.with_additive_fallback(
    codes,
    madam_optax.lns_madam(
      INT8,
      learning_rate=learning_rate,
      factored=True,
      min_dim_size_to_factor=min_dim_size_to_factor,
      seed=seed,
    ),
    ADDITIVE[additive](additive_learning_rate, min_dim_size_to_factor),
    min_ndim=2,
    additive_names=madam_optax.ADDITIVE_NAMES,
  )


def make_run_fn(
  task: loop.Task,
  steps: int,
  *,
  additive: str = "adam",
  additive_learning_rate: float = madam_optax.ADDITIVE_LEARNING_RATE,
) -> Callable[[jax.Array, Any, Any], tuple[step_lib.TrainState, dict]]:
  """A pure ``run(key, learning_rate, data) -> (state, metrics)`` (``vmap``-able).

  The recipe with int8 codes: both rates decay to 0 (cosine) over ``steps``;
  the metrics are the task's evaluation before and after training.
  """
  reference = loop.reference_params(task)["model"]
  # Concrete codes, for labelling the leaves (the run's own may be traced).
  reference_codes, _ = encode_recipe(
    reference, reference, INT8, p_scale=task.p_scale
  )

  def run(key, learning_rate, data):
    init_key, train_key = jax.random.split(key)
    seed = jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1)
    codes, scales = encode_recipe(
      task.init(init_key)["model"], reference, INT8, p_scale=task.p_scale
    )

    def schedule(lr):
      return optimizers_lib.learning_rate_schedule(lr, "cosine", steps)

    tx = recipe_optimizer(
      reference_codes,
      schedule(learning_rate),
      additive=additive,
      additive_learning_rate=schedule(additive_learning_rate),
      seed=seed,
    )
    state = step_lib.init_state(
      {"model": codes}, {"model": tx}, train_key, {"model": scales}
    )
    before = task.evaluate(step_lib.weights(state, INT8), data)
    state, _ = step_lib.train_chunk(
      task.losses, {"model": tx}, state, data, steps, lns_format=INT8
    )
    after = task.evaluate(step_lib.weights(state, INT8), data)
    return state, {"before": before, "after": after}

  return run


def bytes_per_parameter(state: step_lib.TrainState) -> dict[str, float]:
  """What a training state holds between steps, per model parameter.

  ``weights``: the codes, their float32 scales and the float leaves;
  ``optimizer``: the whole optimizer state; ``total``: their sum;
  ``parameters``: the model's parameter count.
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


PROG = "python -m madam_examples.lns_transformer"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  cli.add_run_flags(p, 400)  # --quick: also a shorter corpus
  add = p.add_argument
  add("--lr", type=cli.positive_float, default=0.01, help="Madam's rate (0.01)")
  add(
    "--additive",
    choices=tuple(ADDITIVE),
    default="adam",
    help="the float leaves' optimizer (default adam)",
  )
  add(
    "--additive-lr",
    type=cli.positive_float,
    help=f"its rate (default {madam_optax.ADDITIVE_LEARNING_RATE:g})",
    default=madam_optax.ADDITIVE_LEARNING_RATE,
  )
  return cli.parse_run_args(p, argv, 400)


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains, prints the perplexity and bytes per parameter; returns them
  (and the final state under ``"state"``)."""
  args = parse_args(argv)
  task = tasks.build_task("transformer", quick=args.quick)
  run = make_run_fn(
    task,
    args.steps,
    additive=args.additive,
    additive_learning_rate=args.additive_lr,
  )
  state, metrics = jax.jit(run)(jax.random.key(args.seed), args.lr, task.data)
  held = bytes_per_parameter(state)
  leaves = jax.tree.leaves(state.params["model"])
  encoded = [c for c in leaves if jnp.issubdtype(c.dtype, jnp.integer)]
  n_codes = sum(c.size for c in encoded)
  code_dtypes = sorted({str(c.dtype) for c in encoded})
  before = float(metrics["before"]["perplexity"])
  perplexity = float(metrics["after"]["perplexity"])
  print(
    f"{task.description}: {held['parameters']} parameters, "
    f"{args.steps} steps of the recipe: lns_madam(int8, factored=True) on "
    f"the hidden matrices, {args.additive} on the rest"
  )
  print(f"validation perplexity: {before:.2f} -> {perplexity:.2f}")
  print(
    f"{n_codes} parameters stored as {', '.join(code_dtypes)} codes, "
    f"{held['parameters'] - n_codes} (embeddings, head, norms, biases) in "
    "float32"
  )
  print(
    f"bytes per parameter: weights {held['weights']:.3f} + optimizer "
    f"{held['optimizer']:.3f} = {held['total']:.3f} (float32 Adam: 12)"
  )
  return {
    "perplexity_before": before,
    "perplexity": perplexity,
    "bytes_per_parameter": held,
    "code_dtypes": code_dtypes,
    "coded_parameters": n_codes,
    "steps": args.steps,
    "state": state,
  }


if __name__ == "__main__":
  main()
