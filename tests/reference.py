"""The one independent float64 NumPy implementation of SPEC §1 and §2.

Every numeric comparison in the tests uses it: ``madam_reference`` (SPEC §1,
float weights) and ``integer_rule_reference`` (SPEC §2, integer LNS codes).
Both share the normalised gradient of SPEC steps 2-5.
"""

import numpy as np


def normalised_gradients(grads_seq, *, b2=0.999, g_bound=10.0, b1=0.0):
  """Yields ``(t, g_n)`` for each step: SPEC steps 2-5 in float64.

  ``grads_seq`` is a list of dicts of arrays (one dict per step);
  ``g_n = clip(g / sqrt(v_hat), +-g_bound)`` with 0/0 := 0, where
  ``v = b2 v + (1 - b2) g^2`` and ``v_hat = v / (1 - b2^t)``. With
  ``b1 > 0`` (SPEC "Beyond the paper"), ``g`` in step 4 is replaced by
  ``m_hat = m / (1 - b1^t)``, ``m = b1 m + (1 - b1) g`` (Adam's first moment).
  """
  v = m = None
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    if v is None:
      v = {k: np.zeros_like(x) for k, x in g.items()}
      m = {k: np.zeros_like(x) for k, x in g.items()}
    g_n = {}
    for k in g:
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2  # step 2
      v_hat = v[k] / (1 - b2**t)  # step 3
      numerator = g[k]
      if b1:
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        numerator = m[k] / (1 - b1**t)
      with np.errstate(invalid="ignore", divide="ignore"):
        n = numerator / np.sqrt(v_hat)  # step 4
      n = np.where(np.isnan(n), 0.0, n)
      g_n[k] = np.clip(n, -g_bound, g_bound)  # step 5
    yield t, g_n


def madam_reference(
  params0,
  grads_seq,
  *,
  lr=0.01,
  p_scale=3.0,
  g_bound=10.0,
  b2=0.999,
  max_magnitude=None,
  b1=0.0,
):
  """Runs Madam (SPEC §1) step by step in float64; returns the weight dicts.

  ``params0`` and every element of ``grads_seq`` are dicts of NumPy arrays.
  ``lr`` may be a callable of the 0-based step count (an optax schedule).
  ``b1 > 0`` adds the first moment of :func:`normalised_gradients`.
  """
  w = {k: np.asarray(v, np.float64).copy() for k, v in params0.items()}
  if max_magnitude is None:  # step 1
    w_max = {k: p_scale * np.sqrt(np.mean(v**2)) for k, v in w.items()}
  else:
    w_max = {k: float(max_magnitude) for k in w}
  history = []
  for t, g_n in normalised_gradients(grads_seq, b2=b2, g_bound=g_bound, b1=b1):
    eta = float(lr(t - 1)) if callable(lr) else lr
    new_w = {}
    for k in w:
      x = w[k] * np.exp(-eta * g_n[k] * np.sign(w[k]))  # step 6
      new_w[k] = np.clip(x, -w_max[k], w_max[k])  # step 7
    w = new_w
    history.append({k: x.copy() for k, x in w.items()})
  return history


def integer_rule_reference(
  codes0,
  grads_seq,
  *,
  levels,
  levels_per_unit,
  b2=0.999,
  g_bound=10.0,
  b1=0.0,
):
  """Runs SPEC §2's integer rule on LNS codes; returns the codes per step.

  A code is ``c = s * (levels - k)``: sign ``s``, level ``k``. Each step,
  ``k = clip(k + round(levels_per_unit * g_n * s), 0, levels - 1)`` with
  ``levels_per_unit = lr / log(base)`` (10 for SPEC §2's reference) and
  ``g_n`` from :func:`normalised_gradients`; the sign is kept and code 0 (an
  exact zero) never moves.

  Args:
    codes0: the initial integer codes (one array).
    grads_seq: the gradients per step (arrays shaped like ``codes0``).
    levels: the format's number of levels.
    levels_per_unit: grid levels per unit of normalised gradient.
    b2: as in SPEC §1.
    g_bound: as in SPEC §1.
    b1: the optional first moment (SPEC "Beyond the paper"); 0 for none.

  Returns:
    A list of int64 code arrays, one per step.
  """
  c = np.asarray(codes0, np.int64)
  sign = np.sign(c)
  k = levels - np.abs(c)
  history = []
  for _, g_n in normalised_gradients(
    [{"c": g} for g in grads_seq], b2=b2, g_bound=g_bound, b1=b1
  ):
    step = np.round(levels_per_unit * g_n["c"] * sign).astype(np.int64)
    k = np.clip(k + step, 0, levels - 1)
    history.append(np.where(sign == 0, 0, sign * (levels - k)))
  return history
