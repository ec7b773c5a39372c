"""An independent float64 NumPy implementation of SPEC §1, for the tests."""

import numpy as np


def madam_reference(params0, grads_seq, *, lr=0.01, p_scale=3.0, g_bound=10.0,
                    b2=0.999, max_magnitude=None):
  """Runs Madam step by step in float64; returns the list of weight dicts.

  ``params0`` and every element of ``grads_seq`` are dicts of NumPy arrays.
  ``lr`` may be a callable of the 0-based step count (an optax schedule).
  """
  w = {k: np.asarray(v, np.float64).copy() for k, v in params0.items()}
  if max_magnitude is None:
    w_max = {k: p_scale * np.sqrt(np.mean(v ** 2)) for k, v in w.items()}
  else:
    w_max = {k: float(max_magnitude) for k in w}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  history = []
  for t, grads in enumerate(grads_seq, start=1):
    eta = float(lr(t - 1)) if callable(lr) else lr
    new_w = {}
    for k in w:
      g = np.asarray(grads[k], np.float64)
      v[k] = b2 * v[k] + (1 - b2) * g ** 2                    # step 2
      v_hat = v[k] / (1 - b2 ** t)                            # step 3
      with np.errstate(invalid="ignore", divide="ignore"):
        g_n = g / np.sqrt(v_hat)                              # step 4
      g_n = np.where(np.isnan(g_n), 0.0, g_n)
      g_n = np.clip(g_n, -g_bound, g_bound)                   # step 5
      x = w[k] * np.exp(-eta * g_n * np.sign(w[k]))           # step 6
      new_w[k] = np.clip(x, -w_max[k], w_max[k])              # step 7
    w = new_w
    history.append({k: x.copy() for k, x in w.items()})
  return history
