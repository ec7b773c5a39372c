"""An Equinox MLP trained with Madam on scikit-learn's digits.

Equinox models are plain pytrees with ``None`` for absent parts (here a
``Linear`` without bias) and non-array leaves (the activation). The usual
Equinox pattern applies unchanged:

* ``eqx.filter(model, eqx.is_inexact_array)`` keeps the trainable arrays and
  puts ``None`` elsewhere; the optimizer is built and initialised on it.
* ``madam_optax.with_additive_fallback`` sends the zero-initialised
  ``LayerNorm`` offset, which Madam could never move, to Adam(1e-3).
* ``tx.update`` needs the filtered parameters (Madam's step is relative to
  the weights), and ``eqx.apply_updates`` skips the ``None`` leaves.

Run it with ``python -m madam_examples.equinox_mlp`` (``--quick`` for a
20-step smoke test). Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Sequence
import time
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import cli
from madam_examples import data
import madam_optax

DEFAULT_STEPS = 1000
DEFAULT_LR = 0.01
ADDITIVE_LR = 1e-3


class MLP(eqx.Module):
  """64 -> hidden -> LayerNorm -> activation -> 10, no bias in the head."""

  hidden: eqx.nn.Linear
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear
  activation: Callable[[jax.Array], jax.Array]

  def __init__(self, hidden: int = 128, *, key: jax.Array):
    k_hidden, k_head = jax.random.split(key)
    self.hidden = eqx.nn.Linear(64, hidden, key=k_hidden)
    self.norm = eqx.nn.LayerNorm(hidden)
    self.head = eqx.nn.Linear(hidden, 10, use_bias=False, key=k_head)
    self.activation = jax.nn.relu

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of one flattened 8x8 image (shape (64,)); vmap for a batch."""
    return self.head(self.activation(self.norm(self.hidden(x))))


def trainable(model: eqx.Module) -> Any:
  """The model's floating-point arrays, ``None`` elsewhere."""
  return eqx.filter(model, eqx.is_inexact_array)


def make_optimizer(
  model: eqx.Module, learning_rate: float = DEFAULT_LR
) -> optax.GradientTransformation:
  """Madam for the weights, Adam(1e-3) for the zero-initialised leaves."""
  return madam_optax.with_additive_fallback(
    trainable(model), madam_optax.madam(learning_rate), optax.adam(ADDITIVE_LR)
  )


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = jax.vmap(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """One jitted training step: ``(model, opt_state, x, y) -> same + loss``."""

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, trainable(model))
    return eqx.apply_updates(model, updates), opt_state, loss

  return step


@eqx.filter_jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


class Result(NamedTuple):
  model: MLP
  labels: Any  # "multiplicative" / "additive" / None per leaf
  losses: np.ndarray  # training loss per step
  test_accuracy: float  # in [0, 1]
  seconds: float  # wall-clock, compilation included


def train(
  steps: int = DEFAULT_STEPS,
  learning_rate: float = DEFAULT_LR,
  *,
  batch_size: int = 64,
  hidden: int = 128,
  seed: int = 0,
) -> Result:
  """Trains :class:`MLP` on the digits with Madam and the additive fallback,
  ``steps`` batches of ``batch_size`` images drawn with replacement."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  digits = data.load_digits()
  x_train = jnp.asarray(digits.x_train.reshape(len(digits.x_train), -1))
  x_test = jnp.asarray(digits.x_test.reshape(len(digits.x_test), -1))
  y_train, y_test = jnp.asarray(digits.y_train), jnp.asarray(digits.y_test)

  key_model, key_data = jax.random.split(jax.random.key(seed))
  model = MLP(hidden, key=key_model)
  labels = madam_optax.multiplicative_labels(trainable(model))
  tx = make_optimizer(model, learning_rate)
  opt_state = tx.init(trainable(model))
  step = make_step(tx)

  start = time.perf_counter()
  losses = []
  for key in jax.random.split(key_data, steps):
    idx = jax.random.randint(key, (batch_size,), 0, len(y_train))
    model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx])
    losses.append(loss)
  test_accuracy = float(accuracy(model, x_test, y_test))
  seconds = time.perf_counter() - start
  losses = np.asarray(jax.device_get(losses))
  return Result(model, labels, losses, test_accuracy, seconds)


def describe_labels(labels: Any) -> str:
  """One line: which leaves each optimizer trains, and the ``None`` leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(
    labels, is_leaf=lambda x: x is None
  )[0]
  names: dict[Any, list[str]] = {"multiplicative": [], "additive": [], None: []}
  for path, label in leaves:
    names[label].append(jax.tree_util.keystr(path).lstrip("."))
  return (
    f"Madam: {', '.join(names['multiplicative'])}; "
    f"Adam({ADDITIVE_LR:g}): {', '.join(names['additive'])}; "
    f"None (not trained): {', '.join(names[None])}"
  )


PROG = "python -m madam_examples.equinox_mlp"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  cli.add_run_flags(parser, DEFAULT_STEPS)
  add = parser.add_argument
  add("--lr", type=cli.positive_float, default=DEFAULT_LR, help="rate (0.01)")
  add("--batch-size", type=cli.positive_int, default=64, help="batch (64)")
  return cli.parse_run_args(parser, argv, DEFAULT_STEPS)


@cli.one_line_errors(PROG)
def main(argv: Sequence[str] | None = None) -> Result:
  args = parse_args(argv)
  result = train(
    args.steps, args.lr, batch_size=args.batch_size, seed=args.seed
  )
  print(describe_labels(result.labels))
  print(
    f"Equinox MLP, Madam lr={args.lr:g}, {args.steps} steps: "
    f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
    f"test accuracy {100 * result.test_accuracy:.2f} % "
    f"({result.seconds:.1f} s)"
  )
  return result


if __name__ == "__main__":
  main()
