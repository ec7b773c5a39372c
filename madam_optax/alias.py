"""``madam``: the chain of the composable parts."""

from __future__ import annotations

from typing import Any

import optax

from madam_optax import _checks
from madam_optax.magnitude_bound import clip_weight_magnitude
from madam_optax.multiplicative_step import multiplicative_step
from madam_optax.second_moment import scale_by_second_moment


def madam(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    p_scale: float = 3.0,
    g_bound: float = 10.0,
    b2: float = 0.999,
    *,
    state_dtype: Any = None,
    max_magnitude: float | None = None,
) -> optax.GradientTransformation:
  r"""Madam: the multiplicative version of Adam.

  For each parameter tensor :math:`w` with gradient :math:`g`, at step
  :math:`t = 1, 2, \dots`:

  .. math::

    w_{max} &= p_{scale} \sqrt{\mathrm{mean}(w_0^2)} \quad\text{(once, at init)}\\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
    \hat v = v / (1 - \beta_2^t)\\
    g_n &= \mathrm{clip}(g / \sqrt{\hat v}, -g_{bound}, g_{bound})
      \quad (0/0 := 0)\\
    w &\leftarrow \mathrm{clip}(w\, e^{-\eta\, g_n \mathrm{sign}(w)},
      -w_{max}, w_{max})

  It is ``optax.chain(scale_by_second_moment(b2), optax.clip(g_bound),
  multiplicative_step(learning_rate), clip_weight_magnitude(p_scale))``. The
  default learning rate 0.01 is meant to work across architectures. Weights
  never change sign and zero weights never move: route zero-initialised leaves
  (e.g. Flax's default biases) to an additive optimizer with
  :func:`madam_optax.with_additive_fallback`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    p_scale: per-tensor weight bound as a multiple of the initial RMS.
    g_bound: bound on the normalised gradient.
    b2: decay of the second-moment moving average, in ``[0, 1)``.
    state_dtype: dtype of the second-moment buffer (``None``: the parameter's
      dtype; ``jnp.bfloat16`` halves the state).
    max_magnitude: a fixed weight bound for every tensor instead of
      ``p_scale`` times the initial RMS.

  Returns:
    An ``optax.GradientTransformation``; ``update`` requires ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, madam_optax
    >>> params = {'w': jnp.array([1.0, -2.0, 3.0])}
    >>> loss = lambda p: jnp.sum((p['w'] - 0.5) ** 2)
    >>> tx = madam_optax.madam()
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params['w'].round(3))   # each step moves log|w| by 0.01
    [ 0.971 -1.941  2.912]

  References:
    Bernstein, Zhao, Meister, Liu, Anandkumar, Yue, "Learning compositional
    functions via multiplicative weight updates", NeurIPS 2020,
    arXiv:2006.14560.
  """
  _checks.check_hyperparameter("g_bound", g_bound, low=0.0, low_inclusive=False)
  return optax.chain(
      scale_by_second_moment(b2, state_dtype=state_dtype),
      optax.clip(g_bound),
      multiplicative_step(learning_rate),
      clip_weight_magnitude(p_scale, max_magnitude=max_magnitude),
  )
