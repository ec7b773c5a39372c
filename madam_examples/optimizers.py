"""The examples' optimizer factory: Madam, LNS-Madam, Adam and SGD by name.

Madam keeps every weight's sign and never moves a zero weight, so every Madam
variant hands some leaves to Adam, by one of two policies (``leaves``):

* ``"recipe"``, the Transformer recipe (``madam_optax.madam_labels``): Madam
  trains the hidden weight matrices; embeddings, the output head, norms and
  biases go to Adam at ``madam_optax.ADDITIVE_LEARNING_RATE``, scheduled;
* ``"zero"``: only the leaves all zero at initialisation (Flax's biases,
  LayerNorm offsets) go to Adam(1e-3), unscheduled.

``"auto"`` (the default) is the recipe for a model with an embedding table
and ``"zero"`` otherwise. Learning rates are floats, traced scalars (the
learning-rate study ``vmap``s over them) or optax schedules.

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

import madam_optax

# The float-weight optimizers the demo and the learning-rate study compare
# ("lns_madam", on integer codes, is built by the same factory), and their
# usual rates: Madam's paper default, Adam's 1e-3, SGD's 0.1 (momentum 0.9).
OPTIMIZERS = ("madam", "adam", "sgd")
DEFAULT_LEARNING_RATES = {"madam": 0.01, "adam": 1e-3, "sgd": 0.1}
SCHEDULES = ("cosine", "constant")
# Adam's rate for the zero-initialised leaves under ``leaves="zero"``.
ADDITIVE_FALLBACK_LR = 1e-3
LEAVES = ("auto", "recipe", "zero")


def has_embedding(params: Any) -> bool:
  """Whether a key on some leaf's path names an embedding table.

  Example:
    >>> import jax.numpy as jnp
    >>> has_embedding({'embed': {'embedding': jnp.ones((3, 2))}})
    True
    >>> has_embedding({'dense': {'kernel': jnp.ones((3, 2))}})
    False
  """
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(
    re.search(r"emb|\bwte\b|\bwpe\b", jax.tree_util.keystr(path), re.I)
    for path, _ in paths
  )


def resolve_leaves(leaves: str, params: Any) -> str:
  """``"recipe"`` or ``"zero"``: ``"auto"`` picks by :func:`has_embedding`."""
  if leaves not in LEAVES:
    raise ValueError(f"unknown leaves {leaves!r}; choose one of {LEAVES}.")
  if leaves == "auto":
    return "recipe" if has_embedding(params) else "zero"
  return leaves


def learning_rate_schedule(
  learning_rate: Any, schedule: str, steps: int
) -> Any:
  """``learning_rate`` held constant, or cosine-decayed to 0 over ``steps``.

  Example:
    >>> float(learning_rate_schedule(0.01, "cosine", 100)(100))
    0.0
  """
  if schedule == "constant":
    return learning_rate
  if schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, max(int(steps), 1))
  raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}.")


def make_optimizer(
  name: Any,
  learning_rate: Any,
  params: Any,
  *,
  schedule: str = "constant",
  steps: int = 1,
  p_scale: float = 3.0,
  lns_format: madam_optax.LNSFormat | None = None,
  rounding: str = "stochastic",
  seed: Any = 0,
  state_dtype: Any = None,
  factored: bool = False,
  min_dim_size_to_factor: int = 128,
  additive_learning_rate: Any = None,
  leaves: str = "auto",
  b1: float = 0.0,
) -> optax.GradientTransformation:
  """One optimizer for ``params``' structure, by name.

  Args:
    name: ``"madam"``, ``"lns_madam"`` (integer LNS codes), ``"adam"``,
      ``"sgd"`` (momentum 0.9), or a factory ``(learning_rate, params) ->
      tx`` (given the scheduled rate; the other options are the names').
    learning_rate: a float, a traced scalar or an optax schedule.
    params: concrete initial parameters (float weights, or the codes tree),
      from which the Madam variants label their leaves.
    schedule, steps: see :func:`learning_rate_schedule`; under the recipe
      Adam's rate follows the same schedule.
    p_scale: Madam's weight bound as a multiple of each tensor's initial RMS.
    lns_format: the codes' format (``"lns_madam"`` only).
    rounding, seed: LNS-Madam's rounding of the level step and its seed
      (may be traced).
    state_dtype, factored, min_dim_size_to_factor, b1: the Madam variants'
      second-moment dtype, factored second moment (``madam_optax.madam``'s
      options) and first-moment decay (0: the paper's Madam).
    additive_learning_rate: Adam's rate for the leaves Madam does not train
      (default: :data:`ADDITIVE_FALLBACK_LR`, or under the recipe
      ``madam_optax.ADDITIVE_LEARNING_RATE``).
    leaves: ``"recipe"``, ``"zero"`` or ``"auto"`` (the module docstring).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> tx = make_optimizer("madam", 0.01, params)
    >>> state = tx.init(params)
  """
  lr = learning_rate_schedule(learning_rate, schedule, steps)
  if callable(name):
    return name(lr, params)
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  if name not in ("madam", "lns_madam"):
    choices = (*OPTIMIZERS, "lns_madam")
    raise ValueError(f"unknown optimizer {name!r}; choose one of {choices}.")
  policy = resolve_leaves(leaves, params)
  options = dict(
    learning_rate=lr,
    state_dtype=state_dtype,
    factored=factored,
    min_dim_size_to_factor=min_dim_size_to_factor,
  )
  if b1:  # passed only when set, so the paper's Madam is built unchanged
    options["b1"] = b1
  if name == "madam":
    multiplicative = madam_optax.madam(p_scale=p_scale, **options)
  elif lns_format is None:
    raise ValueError(
      "lns_madam trains LNS codes: pass lns_format, e.g. "
      "madam_optax.LNSFormat.spanning(127)."
    )
  else:
    multiplicative = madam_optax.lns_madam(
      lns_format, rounding=rounding, seed=seed, **options
    )
  if policy == "zero":
    if additive_learning_rate is None:
      additive_learning_rate = ADDITIVE_FALLBACK_LR
    return madam_optax.with_additive_fallback(
      params, multiplicative, optax.adam(additive_learning_rate)
    )
  if additive_learning_rate is None:
    additive_learning_rate = madam_optax.ADDITIVE_LEARNING_RATE
  additive = learning_rate_schedule(additive_learning_rate, schedule, steps)
  return madam_optax.with_additive_fallback(
    params,
    multiplicative,
    optax.adam(additive),
    min_ndim=2,
    additive_names=madam_optax.ADDITIVE_NAMES,
  )


def make_optimizers(
  reference: Mapping[str, Any], name: str, learning_rate: Any, **options: Any
) -> dict[str, optax.GradientTransformation]:
  """One optimizer per component (e.g. of a task's ``reference_params``),
  all of the same kind, rate and schedule (:func:`make_optimizer`'s
  ``options``)."""
  return {
    c: make_optimizer(name, learning_rate, params, **options)
    for c, params in reference.items()
  }
