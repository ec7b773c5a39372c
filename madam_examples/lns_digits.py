"""A Flax NNX classifier trained with int8 weights (LNS-Madam), beside float Madam.

The model's weight matrices are encoded once into 8-bit log-number-system
codes (``madam_optax.lns_encode_tree``); from then on the ``nnx.Module`` stores
``int8`` kernels, the forward pass decodes them on the fly, and
``madam_optax.lns_madam`` updates the codes in the integer domain through an
ordinary ``nnx.Optimizer``. The zero-initialised biases stay in float and are
trained additively (``madam_optax.with_additive_fallback``), the library's
recipe for leaves Madam cannot move. Data: scikit-learn's bundled
handwritten digits (no download).

Run it with ``python -m madam_examples.lns_digits`` (``--quick`` or
``MADAM_QUICK=1`` for a short run). The helpers here (data, models, the
functional trainer) are shared with ``benchmarks/lns_bits.py``.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import madam_optax


# --------------------------------------------------------------------------
# Data: scikit-learn digits, a fixed stratified split.


class Digits(NamedTuple):
  x_train: np.ndarray   # (N, 8, 8, 1) float32, standardised
  y_train: np.ndarray   # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
  """The 1797 bundled 8x8 digits, split once (stratified, fixed seed)."""
  from sklearn.datasets import load_digits as sk_load  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  data = sk_load()
  x = (data.images.astype(np.float32) / 16.0)[..., None]
  y = data.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  mean, std = x_tr.mean(), x_tr.std()
  return Digits((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te)


# --------------------------------------------------------------------------
# Models.


class MLP(nnx.Module):
  """64 -> hidden -> 10, ReLU."""

  def __init__(self, hidden: int = 128, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.out(nnx.relu(self.hidden(x)))


class CNN(nnx.Module):
  """3x3 conv (8 channels), 2x2 average pool, 3x3 conv (16), linear head.

  Small on purpose: the accuracy-versus-bits benchmark trains it ~100 times
  on a shared 2-core CPU.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = nnx.relu(self.conv2(x))
    return self.head(x.reshape((x.shape[0], -1)))


MODELS: dict[str, Callable[[nnx.Rngs], nnx.Module]] = {
    "mlp": lambda rngs: MLP(rngs=rngs),
    "cnn": lambda rngs: CNN(rngs=rngs),
}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------
# LNS helpers for NNX modules.


def encode_model(model: nnx.Module, fmt: madam_optax.LNSFormat) -> Any:
  """Replaces the model's multiplicative ``nnx.Param``s by LNS integer codes.

  Afterwards the module stores ``fmt.dtype`` kernels; zero-initialised
  parameters (biases) stay float. Returns the per-tensor scales (``None``
  where not encoded), needed to decode.
  """
  codes, scales = madam_optax.lns_encode_tree(nnx.state(model, nnx.Param), fmt)
  nnx.update(model, codes)
  return scales


def forward_and_codes(model: nnx.Module) -> tuple[Callable[..., Any], Any]:
  """``(forward, codes)``: ``forward(weights, x)`` runs the model at float
  ``weights`` (decoded codes, for ``madam_optax.lns_value_and_grad``), and
  ``codes`` is the model's current ``nnx.Param`` state (integer kernels)."""
  graphdef, codes, rest = nnx.split(model, nnx.Param, ...)

  def forward(weights, x):
    return nnx.merge(graphdef, weights, rest)(x)

  return forward, codes


def accuracy(logits, labels) -> float:
  return float(jnp.mean(jnp.argmax(logits, -1) == labels)) * 100.0


# --------------------------------------------------------------------------
# The example: int8 LNS-Madam through nnx.Optimizer, then float Madam.


def train_lns_nnx(model: nnx.Module, data: Digits, fmt: madam_optax.LNSFormat,
                  *, steps: int, batch: int = 64, seed: int = 0,
                  rounding: str = "stochastic", factored: bool = False,
                  min_dim_size_to_factor: int = 128) -> tuple[float, list]:
  """Trains ``model`` in place with int8/int16 weights; returns test accuracy
  and a record of the kernels' dtypes seen during training.

  ``factored``/``min_dim_size_to_factor``: as in ``madam_optax.lns_madam``.
  """
  scales = encode_model(model, fmt)
  params = nnx.state(model, nnx.Param)
  tx = madam_optax.with_additive_fallback(         # biases: additive Adam
      params, madam_optax.lns_madam(
          fmt, rounding=rounding, seed=seed, state_dtype=jnp.bfloat16,
          factored=factored, min_dim_size_to_factor=min_dim_size_to_factor),
      optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, scales, x, y):
    forward, codes = forward_and_codes(model)
    loss = lambda w: cross_entropy(forward(w, x), y)
    value, grads = madam_optax.lns_value_and_grad(loss, scales, fmt)(codes)
    optimizer.update(model, grads)     # integer code updates, in place
    return value

  @nnx.jit
  def logits_of(model, scales, x):
    forward, codes = forward_and_codes(model)
    return forward(madam_optax.lns_decode_tree(codes, scales, fmt), x)

  rng = np.random.default_rng(seed)
  dtypes_seen = set()
  for step in range(steps):
    idx = rng.integers(0, len(data.y_train), batch)
    train_step(model, optimizer, scales, data.x_train[idx], data.y_train[idx])
    if step % 50 == 0 or step == steps - 1:
      dtypes_seen |= {str(v.dtype) for v in jax.tree.leaves(
          nnx.state(model, nnx.Param)) if v.ndim >= 2}
  acc = accuracy(logits_of(model, scales, data.x_test), data.y_test)
  return acc, sorted(dtypes_seen)


def train_float_madam_nnx(model: nnx.Module, data: Digits, *, steps: int,
                          batch: int = 64, seed: int = 0,
                          factored: bool = False,
                          min_dim_size_to_factor: int = 128) -> float:
  """The float32 reference: ``madam()`` with the same additive fallback.

  ``factored``/``min_dim_size_to_factor``: as in ``madam_optax.madam``.
  """
  tx = madam_optax.with_additive_fallback(
      nnx.state(model, nnx.Param),
      madam_optax.madam(factored=factored,
                        min_dim_size_to_factor=min_dim_size_to_factor),
      optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(data.y_train), batch)
    train_step(model, optimizer, data.x_train[idx], data.y_train[idx])
  return accuracy(nnx.jit(lambda m, x: m(x))(model, data.x_test), data.y_test)


def param_bytes(model: nnx.Module) -> int:
  return sum(v.nbytes for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv=None) -> dict:
  """Trains float Madam and int8 LNS-Madam from the same initial weights.

  Returns the two test accuracies, parameter bytes and the kernel dtypes seen.
  """
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

  data = load_digits()
  fmt = madam_optax.LNSFormat.spanning(args.levels)
  print(f"LNS format: {fmt.levels} levels, base {fmt.base:.4f}, "
        f"{fmt.dtype} codes; {args.model}, {args.steps} steps of 64")

  t0 = time.perf_counter()
  float_model = MODELS[args.model](nnx.Rngs(args.seed))
  float_bytes = param_bytes(float_model)
  acc_float = train_float_madam_nnx(float_model, data, steps=args.steps,
                                    seed=args.seed)
  t_float = time.perf_counter() - t0

  t0 = time.perf_counter()
  lns_model = MODELS[args.model](nnx.Rngs(args.seed))   # same initial weights
  acc_lns, dtypes = train_lns_nnx(lns_model, data, fmt, steps=args.steps,
                                  seed=args.seed)
  t_lns = time.perf_counter() - t0

  rows = [("madam (float32 weights)", acc_float, float_bytes, t_float),
          (f"lns_madam ({fmt.dtype} weights)", acc_lns, param_bytes(lns_model),
           t_lns)]
  print(f"{'optimizer':<28} {'test acc %':>10} {'param bytes':>12} {'time s':>7}")
  for name, acc, nbytes, seconds in rows:
    print(f"{name:<28} {acc:>10.2f} {nbytes:>12d} {seconds:>7.1f}")
  print(f"weight-matrix dtypes seen during LNS training: {', '.join(dtypes)}")
  return dict(float_accuracy=acc_float, lns_accuracy=acc_lns,
              float_param_bytes=float_bytes, lns_param_bytes=param_bytes(lns_model),
              lns_dtypes=dtypes, steps=args.steps)


if __name__ == "__main__":
  main()
