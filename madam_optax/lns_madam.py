"""Madam on integer LNS codes: natively compressed training (SPEC §2)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax import _checks
from madam_optax import lns_format
from madam_optax.log_quantise import check_rounding
from madam_optax.log_quantise import leaf_keys
from madam_optax.log_quantise import round_levels
from madam_optax.multiplicative_step import learning_rate_at
from madam_optax.second_moment import scale_by_second_moment


class LNSLevelStepState(NamedTuple):
  """State of :func:`lns_level_step`.

  Attributes:
    count: number of updates so far (int32), for learning-rate schedules.
    key: the PRNG key for stochastic rounding (carried, unused, by ``nearest``).
  """
  count: jax.Array
  key: jax.Array


def check_code_leaves(codes: Any, fmt: lns_format.LNSFormat,
                      transform: str) -> None:
  """Raises ``ValueError`` for a leaf that is not an integer array able to hold ``fmt``."""
  for path, c in jax.tree_util.tree_flatten_with_path(codes)[0]:
    name = jax.tree_util.keystr(path) or "<root>"
    dtype = jnp.asarray(c).dtype if not hasattr(c, "dtype") else c.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(
          f"{transform}: params leaf {name} has dtype {dtype}, but this "
          "transform updates integer LNS codes. Encode the weights with "
          "`madam_optax.lns_encode_tree`, and send float leaves (e.g. "
          "zero-initialised biases) to an additive optimizer with "
          "`madam_optax.with_additive_fallback(codes, lns_madam(fmt))`.")
    if fmt.levels > np.iinfo(dtype).max:
      raise ValueError(
          f"{transform}: params leaf {name} is {dtype}, which cannot hold "
          f"codes up to +-{fmt.levels} (LNSFormat.levels={fmt.levels}); "
          f"encode with this format (it uses {fmt.dtype}).")


def lns_level_step(
    fmt: lns_format.LNSFormat,
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    rounding: str = "stochastic",
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""Turns normalised gradients into integer level changes of LNS codes.

  Madam's step :math:`\log|w| \leftarrow \log|w| - \eta\, u\, \mathrm{sign}(w)`
  (SPEC step 6) on :math:`w = s\, w_{max}\, base^{-k}` is an additive step in
  the level :math:`k` (SPEC §2):

  .. math::

    k' = \mathrm{clip}\big(k + \mathrm{R}(\eta\, u\, \mathrm{sign}(w) /
         \log(base)),\ 0,\ levels - 1\big),

  with :math:`\mathrm{R}` the nearest integer (half to even) or stochastic
  rounding :math:`\lfloor x + U \rfloor` (unbiased: steps smaller than one
  level still move on average). The sign is kept, the clamp is SPEC step 7,
  and code 0 (an exact zero) never moves. ``params`` are the integer codes
  (:mod:`madam_optax.lns_format`); the returned updates are the integer code
  changes, of the codes' dtype, so ``optax.apply_updates`` keeps them integers.
  The per-tensor scale is not needed here: it only enters the decoding.

  Args:
    fmt: the codes' :class:`madam_optax.LNSFormat`.
    learning_rate: :math:`\eta`, a float or an optax schedule.
    rounding: ``"stochastic"`` (default) or ``"nearest"``.
    seed: seed of the PRNG key kept in the state.

  Returns:
    An ``optax.GradientTransformation``; ``update`` requires the codes as
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=100, base=1.01)
    >>> tx = madam_optax.lns_level_step(fmt, 0.03, rounding="nearest")
    >>> codes = {'w': jnp.array([50, -50, 99, 0], jnp.int8)}
    >>> u, _ = tx.update({'w': jnp.array([1.0, 1.0, -1.0, 1.0])},
    ...                  tx.init(codes), codes)
    >>> optax.apply_updates(codes, u)['w']   # 0.03 / log(1.01) = 3.01 levels
    Array([ 47, -53, 100,   0], dtype=int8)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  lns_format.check_format(fmt)
  check_rounding(rounding)
  _checks.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  log_base = fmt.log_base
  lr_value = _checks.concrete_value(learning_rate)

  def levels_per_unit(count):
    # Computed in float64 when the rate is a Python number, so that SPEC §2's
    # reference step 0.01 / 0.001 is exactly 10 in float32.
    if lr_value is not None:
      return jnp.float32(lr_value / log_base)
    lr = jnp.asarray(learning_rate_at(learning_rate, count), jnp.float32)
    return lr / jnp.float32(log_base)

  def init_fn(params):
    check_code_leaves(params, fmt, "lns_level_step")
    return LNSLevelStepState(count=jnp.zeros([], jnp.int32),
                             key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    _checks.require_params(params, "lns_level_step")
    _checks.check_same_structure(updates, params, "lns_level_step")
    check_code_leaves(params, fmt, "lns_level_step")
    step = levels_per_unit(state.count)
    key, keys = leaf_keys(state.key, params)

    def leaf(u, c, k):
      c32 = c.astype(jnp.int32)
      s = jnp.sign(c32)
      dk = round_levels(step * u.astype(jnp.float32) * s, rounding, k)
      # |c| = levels - k, so k' = clip(k + dk) is |c'| = clip(|c| - dk).
      mag = jnp.clip(jnp.abs(c32).astype(jnp.float32) - dk, 1, fmt.levels)
      new_c = s * mag.astype(jnp.int32)
      return (new_c - c32).astype(c.dtype)

    new_updates = jax.tree.map(leaf, updates, params, keys)
    return new_updates, LNSLevelStepState(
        count=optax.safe_increment(state.count), key=key)

  return optax.GradientTransformation(init_fn, update_fn)


def _second_moment_for_codes(b2, state_dtype) -> optax.GradientTransformation:
  """``scale_by_second_moment`` whose ``init`` accepts integer codes."""
  inner = scale_by_second_moment(b2, state_dtype=state_dtype)

  def init_fn(params):
    return inner.init(jax.tree.map(
        lambda c: jnp.zeros_like(c, dtype=jnp.float32), params))

  return optax.GradientTransformation(init_fn, inner.update)


def lns_madam(
    fmt: lns_format.LNSFormat,
    learning_rate: optax.ScalarOrSchedule = 0.01,
    g_bound: float = 10.0,
    b2: float = 0.999,
    *,
    rounding: str = "stochastic",
    seed: int = 0,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Madam whose parameters are integer LNS codes (natively compressed).

  The weights are stored as codes :math:`c = s\,(levels - k)` meaning
  :math:`w = s\, w_{max}\, base^{-k}` (:mod:`madam_optax.lns_format`); the
  gradients are taken with respect to the decoded weights. Each step is
  SPEC §2's integer rule:

  .. math::

    g_n &= \mathrm{clip}(g / \sqrt{\hat v}, -g_{bound}, g_{bound})
      \quad\text{(steps 2-5)}\\
    k &\leftarrow \mathrm{clip}\big(k + \mathrm{R}(\eta\, g_n
      \mathrm{sign}(w) / \log(base)),\ 0,\ levels - 1\big),

  with :math:`\mathrm{R}` stochastic (unbiased, default) or nearest rounding.
  It is ``optax.chain(scale_by_second_moment(b2), optax.clip(g_bound),
  lns_level_step(fmt, learning_rate))``. ``update(grads, state, codes)``
  returns integer code changes of the codes' dtype: ``optax.apply_updates``
  keeps the codes ``int8``/``int16``. Float leaves (Flax's zero-initialised
  biases) are refused: use :func:`madam_optax.with_additive_fallback` on the
  codes tree from :func:`madam_optax.lns_encode_tree`, which sends them to an
  additive optimizer. :func:`lns_value_and_grad` gives the gradients.

  Memory: 1 byte per weight (``int8`` codes) plus the second moment (2 bytes
  with ``state_dtype=jnp.bfloat16``), against Adam's 12 bytes in float32.

  Args:
    fmt: the codes' :class:`madam_optax.LNSFormat`.
    learning_rate: :math:`\eta`, a float or an optax schedule.
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average.
    rounding: ``"stochastic"`` (default) or ``"nearest"``.
    seed: seed of the PRNG key (in the state) for stochastic rounding.
    state_dtype: dtype of the second moment (default float32;
      ``jnp.bfloat16`` halves it).

  Returns:
    An ``optax.GradientTransformation`` over the codes; ``update`` requires
    the codes as ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, madam_optax
    >>> fmt = madam_optax.LNSFormat.spanning(127)          # int8 codes
    >>> params = {'w': jnp.array([[0.5, -1.0], [0.25, 2.0]]), 'b': jnp.zeros(2)}
    >>> codes, scales = madam_optax.lns_encode_tree(params, fmt)
    >>> tx = madam_optax.with_additive_fallback(
    ...     codes, madam_optax.lns_madam(fmt), optax.adam(1e-2))
    >>> state = tx.init(codes)
    >>> loss = lambda p: jnp.sum((jnp.ones(2) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> value_and_grad = madam_optax.lns_value_and_grad(loss, scales, fmt)
    >>> for _ in range(50):
    ...   value, grads = value_and_grad(codes)
    ...   updates, state = tx.update(grads, state, codes)
    ...   codes = optax.apply_updates(codes, updates)
    >>> codes['w'].dtype, bool(value < loss(params))
    (dtype('int8'), True)

  References:
    Bernstein, Zhao, Meister, Liu, Anandkumar, Yue, "Learning compositional
    functions via multiplicative weight updates", NeurIPS 2020,
    arXiv:2006.14560.
  """
  _checks.check_hyperparameter("g_bound", g_bound, low=0.0, low_inclusive=False)
  return optax.chain(
      _second_moment_for_codes(b2, state_dtype),
      optax.clip(g_bound),
      lns_level_step(fmt, learning_rate, rounding=rounding, seed=seed),
  )


def lns_madam_reference() -> optax.GradientTransformation:
  r"""SPEC §2's integer variant: base :math:`e^{0.001}`, 4096 levels, step
  :math:`\mathrm{round}(10\, g_n)`, deterministic rounding.

  ``lns_madam(REFERENCE_FORMAT, learning_rate=0.01, rounding="nearest")``:
  :math:`\eta / \log(base) = 0.01 / 0.001 = 10` levels per unit of
  normalised gradient. Encode the weights with
  ``madam_optax.REFERENCE_FORMAT`` (``int16`` codes).

  Returns:
    An ``optax.GradientTransformation`` over ``int16`` codes.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.lns_madam_reference()
    >>> codes = {'w': jnp.array([2000, -2000], jnp.int16)}
    >>> u, _ = tx.update({'w': jnp.array([0.3, 0.3])}, tx.init(codes), codes)
    >>> u['w']                           # g_n = sign(g) at step 1: 10 levels
    Array([-10, -10], dtype=int16)

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  return lns_madam(lns_format.REFERENCE_FORMAT, learning_rate=0.01,
                   rounding="nearest")


def lns_value_and_grad(
    fun: Callable[..., Any],
    scales: Any,
    fmt: lns_format.LNSFormat,
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``fun`` at the decoded weights of LNS codes.

  ``fun(params, *args)`` is written for float weights. The returned function
  takes the codes tree (from :func:`madam_optax.lns_encode_tree`), decodes it
  (:func:`madam_optax.lns_decode_tree`), and returns ``fun``'s value and its
  gradient with respect to the decoded weights: a float tree with the
  structure of the codes, ready for ``lns_madam``'s ``update``.

  Args:
    fun: the loss, differentiable in its first argument.
    scales: the scales tree from :func:`madam_optax.lns_encode_tree`.
    fmt: the :class:`madam_optax.LNSFormat`.
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    ``f(codes, *args) -> (value, grads)`` (``((value, aux), grads)`` with
    ``has_aux``).

  Example:
    >>> import jax.numpy as jnp, madam_optax
    >>> fmt = madam_optax.LNSFormat(levels=4, base=2.0)
    >>> f = madam_optax.lns_value_and_grad(
    ...     lambda p, x: jnp.sum(p['w'] * x), {'w': jnp.float32(1.0)}, fmt)
    >>> f({'w': jnp.array([4, -2], jnp.int8)}, jnp.array([1.0, 2.0]))
    (Array(0.5, dtype=float32), {'w': Array([1., 2.], dtype=float32)})
  """
  lns_format.check_format(fmt)

  def wrapped(codes, *args, **kwargs):
    weights = lns_format.lns_decode_tree(codes, scales, fmt)
    return jax.value_and_grad(
        lambda w: fun(w, *args, **kwargs), has_aux=has_aux)(weights)

  return wrapped
