"""Madam in one pass per tensor: the chain of its four parts, leaf by leaf.

:func:`fused_madam` computes ``optax.chain(scale_by_second_moment,
optax.clip, multiplicative_step, clip_weight_magnitude)`` with the chain's own
state, but walks the parameter tree once and, for each tensor, calls the
parts' own per-tensor functions one after the other
(:func:`second_moment.second_moment_leaf`, ``jnp.clip`` as ``optax.clip``
does, :func:`multiplicative_step.multiplicative_step_leaf`,
:func:`magnitude_bound.bounded_update`); for float32 and float64 tensors the
last two run as :func:`magnitude_bound.bounded_multiplicative_update`, their
composition on magnitudes, tested bit for bit against the two. It has no
maths of its own. What it adds is one fact the chain's parts cannot see:
after the clip, :math:`|\\eta u| \\le \\eta\\, g_{bound}`, which, when
both are numbers with a product of at most
:data:`numerics.REDUCTION_FREE_EXPM1`, lets ``expm1`` skip its range
reduction (the same bits). What is saved is the chain's repeated work:
validating and flattening the tree four times, and tracing (and lowering)
each tensor's computation, which is a nested jit per tensor, so tensors of
one shape and dtype are traced and lowered once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from madam_optax._src import magnitude_bound
from madam_optax._src import moments
from madam_optax._src import multiplicative_step as multiplicative_step_lib
from madam_optax._src import numerics
from madam_optax._src import second_moment
from madam_optax._src import tree_utils
from madam_optax._src import validation

_NAME = "madam"


def _leaf(
  g,
  r,
  w,
  bound,
  lr,
  moment,
  g_bound,
  mu=None,
  first=None,
  max_exponent=None,
  on_magnitudes=True,
):
  """One tensor's step: the four parts' per-tensor functions in turn.

  Returns ``(update, new_rms_hat)``, or ``(update, new_rms_hat, new_mu)`` with a
  first moment ``mu``; ``moment`` is :func:`second_moment.moment_scalars`
  and ``first`` :func:`moments.first_moment_scalars` in ``g``'s compute
  dtype.
  """
  if mu is None:
    u, new_r = second_moment.second_moment_leaf(g, r, *moment)
    new = (new_r,)
  else:
    u, new_mu, new_r = moments.moments_leaf(g, mu, r, first, moment)
    new = (new_r, new_mu)
  u = jnp.clip(u, -g_bound, g_bound)  # optax.clip(g_bound)
  if on_magnitudes and u.dtype == w.dtype and u.dtype in _MAGNITUDE_DTYPES:
    # The last two parts' composition on magnitudes (equal values).
    update = magnitude_bound.bounded_multiplicative_update(
      u, w, lr, bound, max_exponent
    )
    return (update, *new)
  delta = multiplicative_step_lib.multiplicative_step_leaf(
    u, w, lr, max_exponent
  )
  return (magnitude_bound.bounded_update(delta, w, bound), *new)


_MAGNITUDE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# Nested jits: tensors of one shape and dtype (a model's repeated blocks) are
# traced and lowered once; XLA inlines the calls, so the compiled step is
# the same. g_bound is static when it is a number (as optax.clip sees it:
# a Python float keeps u's dtype), traced when it is an array.
_leaf_static_bound = jax.jit(
  _leaf, static_argnames=("g_bound", "max_exponent", "on_magnitudes")
)
_leaf_array_bound = jax.jit(
  _leaf, static_argnames=("max_exponent", "on_magnitudes")
)


def _max_exponent(learning_rate: Any, g_bound: Any) -> float | None:
  """A bound on :math:`|\\eta u|` known at trace time, or None.

  ``lr * g_bound`` when both are numbers and the product is small enough
  for ``expm1`` to skip its range reduction.
  """
  lr_value = validation.concrete_value(learning_rate)
  g_bound_value = validation.concrete_value(g_bound)
  if lr_value is None or g_bound_value is None:
    return None
  bound = abs(lr_value) * abs(g_bound_value)
  return bound if bound <= numerics.REDUCTION_FREE_EXPM1 else None


def has_first_moment(b1: Any) -> bool:
  """Whether ``b1`` asks for a first-moment buffer.

  Not when it is None or a Python or NumPy number equal to 0: that is the
  paper's Madam, with today's state and compiled program. An array (e.g. injected
  by ``optax.inject_hyperparams``, or traced) always does, whatever its
  value, so that the state's structure never depends on a value.
  """
  if b1 is None:
    return False
  if isinstance(b1, (bool, int, float, np.number)):
    return float(b1) != 0.0
  return True


def normaliser(
  b1: Any, b2: Any, state_dtype: Any, mu_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Steps 2-4: :func:`scale_by_second_moment`, or with a first moment
  :func:`moments.scale_by_moments`."""
  if has_first_moment(b1):
    return moments.scale_by_moments(
      b1, b2, state_dtype=state_dtype, mu_dtype=mu_dtype
    )
  if mu_dtype is not None:
    raise ValueError(
      "mu_dtype sets the first moment's dtype, but b1=None (or 0) keeps no "
      "first moment: leave mu_dtype out, or pass b1 > 0."
    )
  return second_moment.scale_by_second_moment(b2, state_dtype=state_dtype)


def fused_madam(
  learning_rate: optax.ScalarOrSchedule = 0.01,
  *,
  p_scale: float = 3.0,
  g_bound: float = 10.0,
  b2: float = 0.999,
  b1: Any = None,
  state_dtype: Any = None,
  mu_dtype: Any = None,
  max_magnitude: float | None = None,
  on_magnitudes: bool = True,
  warn_zero_leaves: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Madam's four parts as one transform with one pass per tensor.

  The same transform as ``optax.chain(scale_by_second_moment(b2,
  state_dtype=state_dtype), optax.clip(g_bound),
  multiplicative_step(learning_rate), clip_weight_magnitude(p_scale,
  max_magnitude=max_magnitude))``: the same state (``init`` is the chain's)
  and, compiled, the same updates and second moments bit for bit.
  :func:`madam_optax.madam` returns this transform unless ``factored``.
  With a first moment (``b1`` other than the number 0, see
  :func:`has_first_moment`) :func:`madam_optax.scale_by_moments` takes the
  first part's place, and the state and numbers are that chain's.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    p_scale: per-tensor weight bound as a multiple of the initial RMS.
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average, in ``[0, 1)``.
    b1: decay of the first-moment moving average, in ``[0, 1)``, or None
      (none: :func:`has_first_moment`).
    state_dtype: dtype of the second-moment buffer.
    mu_dtype: dtype of the first-moment buffer (``None``: ``state_dtype``).
    max_magnitude: a fixed weight bound for every tensor.
    on_magnitudes: run the step and the bound of float32 and float64 tensors
      as :func:`magnitude_bound.bounded_multiplicative_update` (the default);
      ``False`` runs the two parts' own functions instead, for benchmarks
      and tests (the same bits).
    warn_zero_leaves: warn at ``init`` about all-zero leaves (see
      :func:`madam_optax.clip_weight_magnitude`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, madam_optax
    >>> tx = madam_optax.madam()
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> u, _ = tx.update({'w': jnp.array([3.0, 3.0])}, tx.init(params), params)
    >>> new = optax.apply_updates(params, u)['w']       # e^-0.01, -2 e^0.01
    >>> print([round(float(x), 5) for x in new])
    [0.99005, -2.0201]

  References:
    Bernstein et al., "Learning compositional functions via multiplicative
    weight updates", NeurIPS 2020, arXiv:2006.14560.
  """
  with_mu = has_first_moment(b1)
  chain = optax.chain(
    normaliser(b1, b2, state_dtype, mu_dtype),
    optax.clip(g_bound),
    multiplicative_step_lib.multiplicative_step(learning_rate),
    magnitude_bound.clip_weight_magnitude(
      p_scale, max_magnitude=max_magnitude, warn_zero_leaves=warn_zero_leaves
    ),
  )
  max_exponent = _max_exponent(learning_rate, g_bound)
  static_bound = isinstance(g_bound, (int, float, np.number))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax.chain passes them on
    moment_state, clip_state, step_state, bound_state = state
    # The chain's checks, in its order.
    updates = validation.as_arrays(updates)
    validation.check_float_leaves(updates, _NAME, "updates")
    validation.check_same_structure(
      updates, moment_state.rms_hat, _NAME, "optimizer-state"
    )
    validation.require_params(params, _NAME)
    params = validation.as_arrays(params)
    validation.check_same_structure(updates, params, _NAME)
    validation.check_float_leaves(params, _NAME)

    count = optax.safe_increment(moment_state.count)
    lr = jnp.asarray(
      multiplicative_step_lib.learning_rate_at(learning_rate, step_state.count)
    )
    bounds = magnitude_bound.current_bounds(bound_state, params, max_magnitude)
    params_leaves, treedef = jax.tree.flatten(
      params, is_leaf=tree_utils.is_masked
    )
    bounds = tuple(bounds)
    if len(bounds) != len(params_leaves):
      raise ValueError(
        f"{_NAME}: the state holds {len(bounds)} bounds but params have "
        f"{len(params_leaves)} tensors. Initialise the state with "
        "`tx.init(params)` on the same parameter tree."
      )
    scalars = {}  # the moments' scalars per compute dtype, traced once each

    def leaf(g, r, w, bound, mu=None):
      if tree_utils.is_masked(g):
        return (g, r) if mu is None else (g, r, mu)
      ct = numerics.compute_dtype(g.dtype)
      if ct not in scalars:
        scalars[ct] = (
          second_moment.moment_scalars(b2, count, ct),
          moments.first_moment_scalars(b1, count, ct) if with_mu else None,
        )
      moment, first = scalars[ct]
      extra = {} if mu is None else {"mu": mu, "first": first}
      if static_bound:
        return _leaf_static_bound(
          g,
          r,
          w,
          bound,
          lr,
          moment,
          g_bound=g_bound,
          max_exponent=max_exponent,
          on_magnitudes=on_magnitudes,
          **extra,
        )
      return _leaf_array_bound(
        g,
        r,
        w,
        bound,
        lr,
        moment,
        g_bound,
        max_exponent=max_exponent,
        on_magnitudes=on_magnitudes,
        **extra,
      )

    rows = [
      treedef.flatten_up_to(updates),
      treedef.flatten_up_to(moment_state.rms_hat),
      params_leaves,
      bounds,
    ]
    if with_mu:
      rows.append(treedef.flatten_up_to(moment_state.mu))
    outs = [leaf(*row) for row in zip(*rows)]
    new_updates = treedef.unflatten([o[0] for o in outs])
    new_rms_hat = treedef.unflatten([o[1] for o in outs])
    new_moments = {"count": count, "rms_hat": new_rms_hat}
    if with_mu:
      new_moments["mu"] = treedef.unflatten([o[2] for o in outs])
    new_state = (
      moment_state._replace(**new_moments),
      clip_state,
      step_state._replace(count=optax.safe_increment(step_state.count)),
      bound_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
