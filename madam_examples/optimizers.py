"""The examples' optimizer factory: Madam, LNS-Madam, Adam and SGD by name.

Every Madam variant hands the leaves it cannot train to Adam, by one of two
policies (``leaves``):

* ``"recipe"``, the Transformer recipe (``madam_optax.partitioned_madam``'s
  labels): Madam trains the hidden weight matrices; token and position
  embeddings, the output head, norms and biases go to Adam at
  ``madam_optax.ADDITIVE_LEARNING_RATE``, under the same schedule as Madam;
* ``"zero"``: only the leaves that are all zero at initialisation (Flax's
  biases, LayerNorm offsets) go to Adam(1e-3), unscheduled
  (``madam_optax.with_additive_fallback``).

``"auto"`` (the default) is the recipe for a model with an embedding table
(a Transformer) and ``"zero"`` otherwise. Learning rates are floats, traced
scalars (the learning-rate study ``vmap``s over them) or optax schedules.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

import madam_optax

# The float-weight optimizers that the demo and the learning-rate study
# compare; "lns_madam" (integer codes) is built by the same factory.
OPTIMIZERS = ("madam", "adam", "sgd")
LNS_OPTIMIZER = "lns_madam"
SCHEDULES = ("cosine", "constant")
# The usual defaults: Madam's paper default, Adam's 1e-3, SGD's 0.1 (momentum
# 0.9).
DEFAULT_LEARNING_RATES = {"madam": 0.01, "adam": 1e-3, "sgd": 0.1}
# The additive optimizer for the leaves Madam cannot move (zero-initialised
# biases and norm offsets): Adam at its default, whatever Madam's rate.
ADDITIVE_FALLBACK_LR = 1e-3
# Which leaves leave Madam for Adam (see the module docstring).
LEAVES = ("auto", "recipe", "zero")
# Path names of embedding tables: a tree with one gets the recipe under "auto".
EMBEDDING_NAMES = (r"emb", r"^wte$", r"^wpe$")


def has_embedding(params: Any) -> bool:
  """Whether a key on some leaf's path names an embedding table.

  Example:
    >>> import jax.numpy as jnp
    >>> has_embedding({'embed': {'embedding': jnp.ones((3, 2))}})
    True
    >>> has_embedding({'dense': {'kernel': jnp.ones((3, 2))}})
    False
  """
  patterns = [re.compile(p, re.IGNORECASE) for p in EMBEDDING_NAMES]
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(
    pat.search(str(getattr(k, "key", getattr(k, "name", k))))
    for path, _ in paths
    for k in path
    for pat in patterns
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

  The same shape serves every optimizer, so a sweep compares peak rates.

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
  name: str,
  learning_rate: Any,
  params: Any,
  *,
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
    name: ``"madam"``, ``"lns_madam"`` (integer LNS codes), ``"adam"`` or
      ``"sgd"`` (momentum 0.9).
    learning_rate: a float, a traced scalar or an optax schedule.
    params: concrete initial parameters (float weights, or the codes tree);
      the Madam variants use them to find the leaves they cannot move (all
      zero at initialisation).
    p_scale: Madam's weight bound as a multiple of each tensor's initial RMS.
    lns_format: the codes' format (``"lns_madam"`` only).
    rounding: LNS-Madam's rounding of the level step, ``"stochastic"`` or
      ``"nearest"``.
    seed: LNS-Madam's stochastic-rounding seed (may be traced).
    state_dtype: the Madam variants' second-moment dtype (default float32).
    factored: the Madam variants' factored second moment (a statistic per
      row and per column of each matrix whose two largest dimensions are at
      least ``min_dim_size_to_factor``; ``madam_optax.madam(factored=True)``).
    min_dim_size_to_factor: see ``factored``.
    additive_learning_rate: Adam's rate (a float or a schedule) for the
      leaves Madam does not train; default ``ADDITIVE_FALLBACK_LR`` under
      ``leaves="zero"``, ``madam_optax.ADDITIVE_LEARNING_RATE`` under the
      recipe.
    leaves: ``"recipe"``, ``"zero"`` or ``"auto"`` (the module docstring).
    b1: the Madam variants' first-moment decay (0: the paper's Madam).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> tx = make_optimizer("madam", 0.01, params)
    >>> state = tx.init(params)
  """
  if name in ("madam", LNS_OPTIMIZER):
    policy = resolve_leaves(leaves, params)
    # b1 is passed only when set, so the paper's Madam is built unchanged.
    moment = {"b1": b1} if b1 else {}
    if name == "madam":
      multiplicative = madam_optax.madam(
        learning_rate=learning_rate,
        p_scale=p_scale,
        state_dtype=state_dtype,
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
        **moment,
      )
    else:
      if lns_format is None:
        raise ValueError(
          "lns_madam trains LNS codes: pass lns_format, e.g. "
          "madam_optax.LNSFormat.spanning(127)."
        )
      multiplicative = madam_optax.lns_madam(
        lns_format,
        learning_rate=learning_rate,
        rounding=rounding,
        seed=seed,
        state_dtype=state_dtype,
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
        **moment,
      )
    if policy == "recipe":
      # Madam keeps every weight's sign: embeddings, head, norms and biases,
      # which must cross zero, go to Adam (madam_optax.madam_labels).
      if additive_learning_rate is None:
        additive_learning_rate = madam_optax.ADDITIVE_LEARNING_RATE
      return madam_optax.with_additive_fallback(
        params,
        multiplicative,
        optax.adam(additive_learning_rate),
        min_ndim=2,
        additive_names=madam_optax.ADDITIVE_NAMES,
      )
    # The zero-leaf recipe: Madam multiplies weights, so the zero-initialised
    # leaves (Flax's biases and norm offsets) would never move; they go to Adam.
    if additive_learning_rate is None:
      additive_learning_rate = ADDITIVE_FALLBACK_LR
    return madam_optax.with_additive_fallback(
      params, multiplicative, optax.adam(additive_learning_rate)
    )
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=0.9)
  raise ValueError(
    f"unknown optimizer {name!r}; choose one of "
    f"{OPTIMIZERS + (LNS_OPTIMIZER,)}."
  )


def make_optimizers(
  reference: Mapping[str, Any],
  name: str,
  learning_rate: Any,
  *,
  schedule: str = "constant",
  steps: int = 1,
  **options: Any,
) -> dict[str, optax.GradientTransformation]:
  """One optimizer per component (same kind, same learning rate).

  Args:
    reference: component name -> concrete initial parameters (e.g. a
      task's ``reference_params``).
    name, learning_rate: as in :func:`make_optimizer`.
    schedule, steps: see :func:`learning_rate_schedule`; under the recipe
      (``leaves``) Adam's rate for the other leaves follows the same
      schedule.
    **options: the keyword options of :func:`make_optimizer`.

  Returns:
    component name -> ``optax.GradientTransformation``.
  """
  lr = learning_rate_schedule(learning_rate, schedule, steps)
  txs = {}
  for c, params in reference.items():
    opts = dict(options)
    if (
      name in ("madam", LNS_OPTIMIZER)
      and resolve_leaves(opts.get("leaves", "auto"), params) == "recipe"
    ):
      additive = opts.get("additive_learning_rate")
      if additive is None:
        additive = madam_optax.ADDITIVE_LEARNING_RATE
      opts["additive_learning_rate"] = learning_rate_schedule(
        additive, schedule, steps
      )
    txs[c] = make_optimizer(name, lr, params, **opts)
  return txs
