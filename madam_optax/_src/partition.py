"""Which leaves Madam trains, and the additive optimizer for the rest.

A multiplicative update never changes a weight's sign and never moves a zero
weight. Leaves whose entries must cross zero while training (token and
position embeddings, which start near zero and are largely relearned; the
output head, tied to the embeddings in many models; normalisation parameters,
biases and every all-zero leaf) go to an additive optimizer, as
``optax.contrib.muon`` sends its non-matrix leaves to Adam.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import alias
from madam_optax._src import tree_utils

MULTIPLICATIVE = "multiplicative"
ADDITIVE = "additive"
# Path names (regular expressions, searched case-insensitively in every key on
# a leaf's path) of the leaves that :func:`madam_labels` gives to the additive
# optimizer: token and position embeddings (Flax ``Embed``/``embedding``,
# Equinox ``Embedding`` fields named ``emb...``, GPT-2's ``wte``/``wpe``), the
# output head, normalisation layers (``LayerNorm_0``, ``norm1``, ``ln_f``) and
# biases.
ADDITIVE_NAMES = (
  r"emb",
  r"^wte$",
  r"^wpe$",
  r"^pos",
  r"position",
  r"head$",
  r"norm",
  r"^ln(_|\d|$)",
  r"bias",
)
# Adam's rate for the additive leaves in :func:`partitioned_madam`: the best
# of 1e-3, 3e-3, 1e-2, 3e-2 on the examples' Transformer (1,200 steps, step
# decay, Madam at 0.1 and at 0.01; benchmarks/results/lr_sweep.md).
ADDITIVE_LEARNING_RATE = 3e-2


def multiplicative_labels(params: Any, *, min_ndim: int = 0) -> Any:
  """Labels each leaf ``"multiplicative"`` or ``"additive"`` for ``optax.partition``.

  Madam multiplies weights, so a weight never changes sign and a zero weight
  never moves. A leaf whose entries are all zero at initialisation (Flax's
  default biases and normalisation offsets) is labelled ``"additive"``; so is
  any leaf with fewer than ``min_ndim`` dimensions (``min_ndim=2`` sends every
  bias and norm scale to the additive optimizer, which also lets them change
  sign). Everything else is ``"multiplicative"``, and so is every integer
  leaf (LNS codes for :func:`madam_optax.lns_madam`, whatever their values or
  ``ndim``): an additive optimizer's float updates to integer parameters
  would be truncated by ``optax.apply_updates`` without a word.

  The labels are computed once from concrete initial parameters, outside
  ``jit``; pass the resulting tree to ``optax.partition``. A Flax NNX state
  (``nnx.state(model, nnx.Param)``) can be passed directly: each ``Variable``
  gets one label, which fits both the state ``nnx.Optimizer`` initialises from
  and the plain arrays it updates.

  Args:
    params: the initial parameters (concrete arrays; ``None`` leaves allowed).
    min_ndim: leaves with fewer dimensions are labelled ``"additive"``.

  Returns:
    A pytree of strings with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> madam_optax.multiplicative_labels(
    ...     {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)})
    {'b': 'additive', 'w': 'multiplicative'}
  """

  return madam_labels(params, additive_names=(), min_ndim=min_ndim)


def _key_name(key: Any) -> str:
  """A path key as text: a dict key, an attribute name or a sequence index."""
  for field in ("key", "name", "idx"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def madam_labels(
  params: Any,
  *,
  additive_names: Sequence[str] = ADDITIVE_NAMES,
  min_ndim: int = 2,
) -> Any:
  """Labels the leaves Madam trains ``"multiplicative"``, the rest ``"additive"``.

  Madam's step ``w <- w * exp(-lr * g_n * sign(w))`` (arXiv:2006.14560,
  Algorithm 1) keeps every weight's sign and never moves a zero. A leaf is
  ``"additive"`` (for an optimizer that can cross zero) when, in this order:

  1. it is not an integer leaf (LNS codes are always ``"multiplicative"``:
     an additive optimizer's float updates would be truncated), and
  2. it has fewer than ``min_ndim`` dimensions (biases, norm scales), or
  3. it is all zero at initialisation, or
  4. a key on its path matches one of ``additive_names`` (regular
     expressions searched case-insensitively; the default
     :data:`ADDITIVE_NAMES` finds token and position embeddings, the output
     head, normalisation layers and biases in Flax NNX, Flax linen and
     Equinox trees).

  Everything else, the hidden weight matrices and convolution kernels, is
  ``"multiplicative"``. The default is the Transformer recipe: on the
  examples' character Transformer Adam moves embedding entries across
  zero, which Madam cannot do (docs/zero_and_sign.md).
  ``additive_names=()`` with ``min_ndim=0`` is
  :func:`multiplicative_labels` (only all-zero leaves are additive).

  The labels are computed once from concrete initial parameters, outside
  ``jit``. A Flax NNX state (``nnx.state(model, nnx.Param)``) gets one label
  per ``Variable``; an Equinox model should be filtered first
  (``eqx.filter(model, eqx.is_inexact_array)``), its non-arrays ``None``.

  Args:
    params: the initial parameters (concrete arrays; ``None`` leaves allowed).
    additive_names: path-key patterns of the additive leaves.
    min_ndim: leaves with fewer dimensions are additive.

  Returns:
    A pytree of ``"multiplicative"``/``"additive"`` with ``params``' structure.

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> params = {'embed': {'embedding': jnp.ones((5, 2))},
    ...           'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
    >>> madam_optax.madam_labels(params)
    {'dense': {'bias': 'additive', 'kernel': 'multiplicative'}, \
'embed': {'embedding': 'additive'}}
  """
  patterns = [re.compile(p, re.IGNORECASE) for p in additive_names]

  def label(path, p):
    if tree_utils.is_variable(p):
      p = p.get_value()
    if isinstance(p, jax.core.Tracer):
      raise ValueError(
        "madam_labels needs concrete initial parameters; call it outside "
        "jax.jit, once, before building the optimizer."
      )
    if jnp.issubdtype(jnp.result_type(p), jnp.integer):
      # LNS codes: an additive optimizer's float updates would be truncated.
      return MULTIPLICATIVE
    if jnp.ndim(p) < min_ndim or not np.any(np.asarray(p)):
      return ADDITIVE
    names = [_key_name(k) for k in path]
    if any(pat.search(n) for pat in patterns for n in names):
      return ADDITIVE
    return MULTIPLICATIVE

  return jax.tree_util.tree_map_with_path(
    label, params, is_leaf=tree_utils.is_variable
  )


def with_additive_fallback(
  params: Any,
  multiplicative_tx: optax.GradientTransformation,
  additive_tx: optax.GradientTransformation | None = None,
  *,
  min_ndim: int = 0,
  additive_names: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  """Trains the leaves Madam can move multiplicatively and the rest additively.

  ``optax.partition`` over :func:`madam_labels`. With the defaults (no
  ``additive_names``, ``min_ndim=0``) only the leaves that are all zero at
  initialisation go to ``additive_tx`` (:func:`multiplicative_labels`);
  :func:`partitioned_madam` is the Transformer recipe built on this.

  Args:
    params: the initial parameters (concrete), used only for labelling.
    multiplicative_tx: e.g. ``madam_optax.madam()``.
    additive_tx: the optimizer for the rest; default ``optax.adam(1e-3)``.
    min_ndim: see :func:`madam_labels`.
    additive_names: see :func:`madam_labels`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for ``params``' structure.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> tx = madam_optax.with_additive_fallback(
    ...     params, madam_optax.madam(), optax.adam(1e-3))
    >>> state = tx.init(params)
  """
  if additive_tx is None:
    additive_tx = optax.adam(1e-3)
  labels = madam_labels(
    params, additive_names=additive_names, min_ndim=min_ndim
  )
  # Passed as a function: ``optax.partition`` calls a callable labels tree,
  # and an Equinox model (so its tree of labels) is callable.
  return optax.partition(
    {MULTIPLICATIVE: multiplicative_tx, ADDITIVE: additive_tx}, lambda _: labels
  )


def partitioned_madam(
  params: Any,
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  additive_tx: optax.GradientTransformation | None = None,
  additive_learning_rate: optax.ScalarOrSchedule = ADDITIVE_LEARNING_RATE,
  additive_names: Sequence[str] = ADDITIVE_NAMES,
  min_ndim: int = 2,
  **madam_options: Any,
) -> optax.GradientTransformationExtraArgs:
  """Madam on the hidden weight matrices, Adam on the rest: the Transformer recipe.

  For each leaf labelled by :func:`madam_labels`:

  * ``"multiplicative"`` (hidden kernels): ``madam(learning_rate,
    **madam_options)``, ``w <- clip(w * exp(-lr * clip(g / sqrt(v_hat)) *
    sign(w)), -w_max, w_max)``;
  * ``"additive"`` (embeddings, positions, output head, norms, biases,
    all-zero leaves): ``additive_tx``, by default
    ``optax.adam(additive_learning_rate)``, which can change a weight's sign.

  Madam never changes a weight's sign; Adam moves embedding entries of the
  examples' character Transformer across zero, and on it this
  recipe closes most of Madam's perplexity gap to a tuned Adam (the
  learning-rate study, docs/studies.md). On models without embeddings (an
  MLP, a CNN) only biases, norms and a leaf named ``head`` leave Madam.

  Args:
    params: the initial parameters (concrete), used only for labelling; a
      Flax NNX ``nnx.state(model, nnx.Param)``, Flax linen params or a
      filtered Equinox model.
    learning_rate: Madam's rate, a float or an optax schedule.
    additive_tx: the optimizer of the additive leaves; default
      ``optax.adam(additive_learning_rate)``.
    additive_learning_rate: Adam's rate (a float or a schedule) when
      ``additive_tx`` is not given.
    additive_names, min_ndim: which leaves are additive
      (:func:`madam_labels`).
    **madam_options: the other arguments of :func:`madam_optax.madam`
      (``p_scale``, ``b2``, ``g_bound``, ``state_dtype``, ``factored``...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` for ``params``' structure.

  Example:
    >>> import jax, jax.numpy as jnp, optax, madam_optax
    >>> params = {'embed': jax.random.normal(jax.random.key(0), (5, 4)),
    ...           'dense': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
    >>> tx = madam_optax.partitioned_madam(params, 0.01)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  if additive_tx is None:
    additive_tx = optax.adam(additive_learning_rate)
  return with_additive_fallback(
    params,
    alias.madam(learning_rate, **madam_options),
    additive_tx,
    min_ndim=min_ndim,
    additive_names=additive_names,
  )
