"""The character Transformer trained with int8 weights and a factored second moment.

The examples' Transformer language model (``train.build_task("transformer")``)
with its weight tensors stored as 8-bit log-number-system codes
(``madam_optax.lns_encode_tree``) and trained by
``madam_optax.lns_madam(fmt, factored=True)``: each matrix keeps one
second-moment statistic per row and per column instead of one per weight, so
weights plus optimizer state come to about one byte per parameter for large
matrices. The zero-initialised biases and LayerNorm offsets stay float32 and
are trained by Adam (``madam_optax.with_additive_fallback``). The script
prints the validation perplexity before and after, and the bytes per
parameter the training state holds.

  python -m madam_examples.lns_transformer --steps 400

The model is small (width 32), so its matrices are factored from
``--min-dim-size-to-factor 8`` (Adafactor's default 128 is meant for large
models) and its float biases weigh more than in a large model.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560; Shazeer and
Stern, "Adafactor", arXiv:1804.04235.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import train as train_lib
import madam_optax

INT8 = madam_optax.LNSFormat.spanning(127)
QUICK_STEPS = 20


class LNSTrainState(NamedTuple):
  """A single-model task's LNS training state: a plain pytree.

  Attributes:
    codes: the model's parameters, integer codes where encoded and float
      elsewhere (an ``nnx.State``).
    max_magnitudes: the per-tensor :math:`w_{max}` (``None`` where float).
    opt_state: the optimizer state.
    key: the PRNG key for batches, split as ``train.train_step`` splits it.
    step: steps done.
  """
  codes: Any
  max_magnitudes: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array


def make_lns_optimizer(codes: Any, fmt: madam_optax.LNSFormat,
                       learning_rate: Any, *, factored: bool = True,
                       min_dim_size_to_factor: int = 8, seed: int = 0,
                       state_dtype: Any = None
                       ) -> optax.GradientTransformation:
  """``lns_madam`` on the codes, Adam on the float (zero-initialised) leaves."""
  return madam_optax.with_additive_fallback(
      codes, madam_optax.lns_madam(
          fmt, learning_rate, factored=factored,
          min_dim_size_to_factor=min_dim_size_to_factor, seed=seed,
          state_dtype=state_dtype),
      optax.adam(train_lib.ADDITIVE_FALLBACK_LR))


def init_lns_state(task: train_lib.Task, fmt: madam_optax.LNSFormat,
                   key: jax.Array) -> tuple[LNSTrainState, Any]:
  """Encodes ``task``'s initial weights (the ones ``train.init_state`` draws
  from the same key) and returns the state with the key for the batches."""
  init_key, train_key = jax.random.split(key)
  params = task.init(init_key)["model"]
  codes, max_magnitudes = madam_optax.lns_encode_tree(
      params, fmt, p_scale=task.p_scale)
  return LNSTrainState(codes, max_magnitudes, None, train_key,
                       jnp.zeros((), jnp.int32)), params


def lns_train_step(task: train_lib.Task, tx: optax.GradientTransformation,
                   fmt: madam_optax.LNSFormat, state: LNSTrainState,
                   data: Any) -> tuple[LNSTrainState, jax.Array]:
  """One step: the task's loss at the decoded weights, integer code updates."""
  key, batch_key = jax.random.split(state.key)
  loss = task.losses["model"]
  value, grads = madam_optax.lns_value_and_grad(
      lambda w: loss({"model": w}, data, batch_key), state.max_magnitudes,
      fmt)(state.codes)
  updates, opt_state = tx.update(grads, state.opt_state, state.codes)
  codes = optax.apply_updates(state.codes, updates)
  return state._replace(codes=codes, opt_state=opt_state, key=key,
                        step=state.step + 1), value


def evaluate_lns(task: train_lib.Task, fmt: madam_optax.LNSFormat,
                 state: LNSTrainState, data: Any) -> dict[str, jax.Array]:
  """The task's metrics at the decoded weights."""
  weights = madam_optax.lns_decode_tree(state.codes, state.max_magnitudes, fmt)
  return task.evaluate({"model": weights}, data)


def train_lns(task: train_lib.Task, fmt: madam_optax.LNSFormat = INT8,
              learning_rate: float = 0.01, *, seed: int = 0,
              steps: int | None = None, schedule: str = "cosine",
              factored: bool = True, min_dim_size_to_factor: int = 8,
              state_dtype: Any = None
              ) -> tuple[LNSTrainState, dict[str, float]]:
  """Trains a single-model task of ``train.build_task`` with LNS codes.

  The batches and the initial weights are those of ``train.train`` with the
  same ``seed`` (the key is split the same way), so a float run and an LNS
  run differ only in the weights' storage and the optimizer.

  Args:
    task: e.g. ``train.build_task("transformer")``.
    fmt: the codes' format (default: 127 levels, ``int8``).
    learning_rate: the (peak) learning rate of ``lns_madam``.
    seed: initialisation, batch and stochastic-rounding seed.
    steps: training steps (default ``task.steps``).
    schedule: ``"cosine"`` or ``"constant"`` (``train.learning_rate_schedule``).
    factored: the factored second moment (else the full one).
    min_dim_size_to_factor: see ``madam_optax.scale_by_factored_second_moment``.
    state_dtype: dtype of the second-moment statistics (default float32).

  Returns:
    The final state and the task's metrics at its end.
  """
  steps = task.steps if steps is None else steps
  state, _ = init_lns_state(task, fmt, jax.random.key(seed))
  tx = make_lns_optimizer(
      state.codes, fmt, train_lib.learning_rate_schedule(
          learning_rate, schedule, steps), factored=factored,
      min_dim_size_to_factor=min_dim_size_to_factor, seed=seed,
      state_dtype=state_dtype)
  state = state._replace(opt_state=tx.init(state.codes))

  @jax.jit
  def run(state, data):
    return jax.lax.fori_loop(
        0, steps, lambda _, s: lns_train_step(task, tx, fmt, s, data)[0],
        state)

  state = run(state, task.data)
  metrics = jax.jit(lambda s, d: evaluate_lns(task, fmt, s, d))(state,
                                                                task.data)
  return state, {k: float(v) for k, v in metrics.items()}


def bytes_per_parameter(state: LNSTrainState) -> dict[str, float]:
  """What the training state holds between steps, per model parameter.

  ``weights``: the codes, their float32 scales and the float leaves;
  ``optimizer``: the whole optimizer state (statistics, Adam's moments of the
  float leaves, counts, PRNG key); ``total``: their sum. Bytes are the
  arrays' ``.nbytes``.
  """
  n = sum(int(np.size(x)) for x in jax.tree.leaves(state.codes))

  def nbytes(tree):
    return sum(np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x).nbytes
               for x in jax.tree.leaves(tree))

  weights = nbytes((state.codes, state.max_magnitudes))
  optimizer = nbytes(state.opt_state)
  return {"parameters": n, "weights": weights / n, "optimizer": optimizer / n,
          "total": (weights + optimizer) / n}


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains, prints the perplexity and bytes per parameter; returns them
  (and the final :class:`LNSTrainState` under ``"state"``)."""
  parser = argparse.ArgumentParser(
      prog="python -m madam_examples.lns_transformer",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=positive_int, default=400,
                      help="training steps")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--lr", type=float, default=0.01,
                      help="peak learning rate (cosine decay to 0)")
  parser.add_argument("--min-dim-size-to-factor", type=positive_int,
                      default=8, help="factor matrices whose two largest "
                      "dimensions are at least this large")
  parser.add_argument("--quick", action="store_true",
                      help=f"{QUICK_STEPS} steps on a short corpus (also "
                           "MADAM_QUICK=1)")
  args = parser.parse_args(argv)
  if not args.lr > 0:
    parser.error(f"--lr must be positive, got {args.lr}")
  quick = args.quick or os.environ.get("MADAM_QUICK") == "1"
  if quick:
    args.steps = min(args.steps, QUICK_STEPS)

  task = train_lib.build_task("transformer", quick=quick)
  initial, _ = init_lns_state(task, INT8, jax.random.key(args.seed))
  before = evaluate_lns(task, INT8, initial, task.data)
  state, after = train_lns(task, INT8, args.lr, seed=args.seed,
                           steps=args.steps,
                           min_dim_size_to_factor=args.min_dim_size_to_factor)
  held = bytes_per_parameter(state)
  encoded = [c for c, m in zip(
      jax.tree.leaves(state.codes),
      jax.tree.leaves(state.max_magnitudes, is_leaf=lambda x: x is None))
             if m is not None]
  n_codes = sum(int(c.size) for c in encoded)
  code_dtypes = sorted({str(c.dtype) for c in encoded})
  print(f"{task.description}: {held['parameters']} parameters, "
        f"{args.steps} steps of lns_madam(int8, factored=True)")
  print(f"validation perplexity: {float(before['perplexity']):.2f} -> "
        f"{after['perplexity']:.2f}")
  print(f"{n_codes} parameters stored as {', '.join(code_dtypes)} codes, "
        f"{held['parameters'] - n_codes} (zero-initialised) in float32")
  print(f"bytes per parameter: weights {held['weights']:.3f} + optimizer "
        f"{held['optimizer']:.3f} = {held['total']:.3f} (float32 Adam: 12)")
  return {"perplexity_before": float(before["perplexity"]),
          "perplexity": after["perplexity"], "bytes_per_parameter": held,
          "code_dtypes": code_dtypes, "coded_parameters": n_codes,
          "steps": args.steps, "state": state}


if __name__ == "__main__":
  main()
