"""The examples' tasks: data, model, loss and metric for each family.

Three of the paper's four families (arXiv:2006.14560, Figure 1), small
enough for a 2-core CPU: an MLP and a CNN classifying scikit-learn's digits
(or the user's CIFAR-10), and a causal Transformer character language model
on the standard library's docstrings (or the user's text); the GAN is in
``benchmarks/study_tasks.py``. Each is a :class:`madam_examples.loop.Task`::

  task = build_task("mlp")
  state, history = loop.train(task, "madam", 0.01)
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_examples import data as data_lib
from madam_examples import loop
from madam_examples import models
from madam_examples.cli import QUICK_STEPS
from madam_examples.cli import InputError

TASKS = ("mlp", "cnn", "transformer")
DEFAULT_STEPS = {"mlp": 600, "cnn": 300, "transformer": 400}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels (nats)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def next_char_loss(
  model: Callable[[jax.Array], jax.Array], windows: jax.Array
) -> jax.Array:
  """Mean next-character cross-entropy of windows (N, T + 1) of token ids."""
  return cross_entropy(model(windows[:, :-1]), windows[:, 1:])


def _init_fn(make: Callable[[nnx.Rngs], nnx.Module]) -> tuple[Any, Callable]:
  """The model's graphdef and ``key -> parameters`` (a pure ``nnx.State``)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

  def init(key):
    return nnx.as_pure(nnx.split(make(nnx.Rngs(key)))[1])

  return graphdef, init


def classification_task(
  name: str,
  description: str,
  images: data_lib.ImageData,
  make: Callable[[nnx.Rngs], nnx.Module],
  *,
  batch_size: int,
  steps: int,
  eval_every: int,
  max_eval: int = 2000,
) -> loop.Task:
  """An image classifier: random minibatches, test accuracy (%) and loss.

  ``make`` is ``rngs -> model`` mapping images (N, H, W, C) to logits; the
  task's one component is ``"model"``, its batches are drawn with
  replacement, and at most ``max_eval`` test images are evaluated.
  """
  graphdef, init_model = _init_fn(make)
  data = {
    "x": jnp.asarray(images.x_train),
    "y": jnp.asarray(images.y_train),
    "x_test": jnp.asarray(images.x_test[:max_eval]),
    "y_test": jnp.asarray(images.y_test[:max_eval]),
  }

  def loss(weights, data, key):
    idx = jax.random.randint(key, (batch_size,), 0, data["x"].shape[0])
    logits = nnx.merge(graphdef, weights["model"])(data["x"][idx])
    return cross_entropy(logits, data["y"][idx])

  def evaluate(weights, data):
    logits = nnx.merge(graphdef, weights["model"])(data["x_test"])
    y = data["y_test"]
    return {
      "accuracy": 100.0 * jnp.mean(jnp.argmax(logits, -1) == y),
      "test_loss": cross_entropy(logits, y),
    }

  return loop.Task(
    name,
    description,
    "accuracy",
    True,
    3.0,
    steps,
    eval_every,
    {"model": graphdef},
    lambda k: {"model": init_model(k)},
    {"model": loss},
    evaluate,
    data,
  )


def _windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
  count = min(count, len(tokens) // length)
  return tokens[: count * length].reshape(count, length)


def language_model_task(
  text: data_lib.TextData,
  *,
  context: int,
  dim: int,
  depth: int,
  batch_size: int,
  steps: int,
  eval_every: int,
  eval_windows: int = 256,
  source: str | None = None,
) -> loop.Task:
  """A :class:`models.CharTransformer` (4 heads) learning ``text``.

  Training windows of ``context + 1`` characters start at random offsets;
  the metric is the perplexity on up to ``eval_windows`` validation
  windows. ``source`` (where the text came from) ends the description.
  """
  if len(text.train) <= context + 1 or len(text.valid) < context + 1:
    raise InputError(
      f"the text is too short for context {context}: give at least "
      f"{10 * (context + 1)} characters."
    )
  graphdef, init_model = _init_fn(
    lambda r: models.CharTransformer(
      len(text.vocab), context, dim, depth, 4, rngs=r
    )
  )
  data = {
    "tokens": jnp.asarray(text.train),
    "valid": jnp.asarray(_windows(text.valid, context + 1, eval_windows)),
  }

  def loss(weights, data, key):
    starts = jax.random.randint(
      key, (batch_size,), 0, data["tokens"].shape[0] - context - 1
    )
    windows = jax.vmap(
      lambda s: jax.lax.dynamic_slice(data["tokens"], (s,), (context + 1,))
    )(starts)
    return next_char_loss(nnx.merge(graphdef, weights["model"]), windows)

  def evaluate(weights, data):
    nll = next_char_loss(nnx.merge(graphdef, weights["model"]), data["valid"])
    return {"perplexity": jnp.exp(nll), "test_loss": nll}

  description = (
    f"Transformer char LM ({depth} layers, d={dim}, context {context})"
  )
  return loop.Task(
    "transformer",
    description + (f" on {source}" if source else ""),
    "perplexity",
    False,
    2.0,
    steps,
    eval_every,
    {"model": graphdef},
    lambda k: {"model": init_model(k)},
    {"model": loss},
    evaluate,
    data,
  )


def build_task(
  name: str,
  *,
  data_path: str | None = None,
  quick: bool = False,
  max_unknown_fraction: float = data_lib.MAX_UNKNOWN_FRACTION,
) -> loop.Task:
  """Builds one of ``TASKS`` on offline data (or the user's data).

  The models are small on purpose: the demo and the learning-rate study run
  on a 2-core CPU in minutes.

  Args:
    name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
    data_path: a CIFAR-10 python-pickle folder (``mlp``, ``cnn``), or a text
      file or folder of ``.txt`` files (``transformer``).
    quick: :data:`~madam_examples.cli.QUICK_STEPS` steps (and, for the
      Transformer, a shorter corpus).
    max_unknown_fraction: see :func:`madam_examples.data.load_text_files`.

  Raises:
    InputError: (a ``ValueError``) for an unknown task or unusable data.
  """
  if name not in TASKS:
    raise InputError(f"unknown task {name!r}; choose one of {TASKS}.")
  steps = QUICK_STEPS if quick else DEFAULT_STEPS[name]
  if name in ("mlp", "cnn"):
    if data_path:
      images, source = data_lib.load_cifar10(data_path), "CIFAR-10"
    else:
      images, source = data_lib.load_digits(), "digits"
    shape = images.x_train.shape[1:]
    classes = images.num_classes
    if name == "mlp":
      size = int(np.prod(shape))
      return classification_task(
        "mlp",
        f"MLP {size}-256-256-{classes} on {source}",
        images,
        lambda r: models.MLP(size, (256, 256), classes, rngs=r),
        batch_size=64,
        steps=steps,
        eval_every=50,
      )
    return classification_task(
      "cnn",
      f"CNN (convs 8-16, average pooling) on {source}",
      images,
      lambda r: models.CNN(shape, classes, (8, 16), rngs=r),
      batch_size=32,
      steps=steps,
      eval_every=25,
    )
  source = None
  if data_path:
    text = data_lib.load_text_files(
      data_path, max_unknown_fraction=max_unknown_fraction
    )
    source = (
      f"{data_path} ({text.num_chars:,} characters, "
      f"{text.unknown / text.num_chars:.1%} unknown, read as "
      f"{data_lib.UNKNOWN_CHAR!r})"
    )
  else:
    text = data_lib.load_stdlib_text(60_000 if quick else 400_000)
  return language_model_task(
    text,
    context=32,
    dim=32,
    depth=2,
    batch_size=16,
    steps=steps,
    eval_every=50,
    source=source,
  )
