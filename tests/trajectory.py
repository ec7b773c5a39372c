"""A few steps of Madam's float variants on a small mixed tree, as arrays.

``python -m tests.trajectory`` (from the repository root) writes
``tests/data/madam_trajectory.npz``; it was written by the code whose state
fixed the weight bound at ``init`` and kept the bounds in a flat tuple, and
``tests/test_trajectory.py`` checks that today's code gives the same bits.
One rewrite since: the ``b1`` variant's first moment, when its mean got a
guard against rounding to inf near float32's largest value (with the guard
after it, XLA compiles the mean's two products and sum differently, so a
few entries differ in their last bits; every parameter and second moment
kept its bits). A second rewrite, of every variant: the second moment's
state became the bias-corrected root ``rms_hat`` (so that gradients of 1e-37
no longer underflow), with its weights computed without cancellation, which
rounds differently: against the file before it, 88-94 of the 272 parameter
entries of each full or factored variant moved, by at most 8 ulps (``b1``:
75, at most 4), all closer to SPEC's float64 Madam than before (the largest
relative error of a float32 weight from 5.6e-7 to 1.2e-7,
``test_the_saved_trajectory_follows_the_float64_reference``); the bfloat16
state, rounded from another quantity, moved 108 entries (by at most 3.7e-4
relative, within that state's own precision).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax

PATH = os.path.join(os.path.dirname(__file__), "data", "madam_trajectory.npz")
STEPS = 4

VARIANTS = {
  "madam": lambda: madam_optax.madam(0.05),
  "madam_p_scale": lambda: madam_optax.madam(0.05, p_scale=1.5),
  "chain": lambda: optax.chain(
    madam_optax.scale_by_second_moment(0.999),
    optax.clip(10.0),
    madam_optax.multiplicative_step(0.05),
    madam_optax.clip_weight_magnitude(1.5),
  ),
  "factored": lambda: madam_optax.madam(
    0.05, factored=True, min_dim_size_to_factor=4
  ),
  "b1": lambda: madam_optax.madam(0.05, b1=0.9),
  "bf16_state": lambda: madam_optax.madam(0.05, state_dtype=jnp.bfloat16),
}


def params():
  """A small tree of float32 and bfloat16 tensors (a matrix to factor)."""
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "dense": {
      "kernel": jax.random.normal(k[0], (6, 5), jnp.float32),
      "bias": jax.random.normal(k[1], (5,), jnp.float32) * 0.1,
    },
    "head": jax.random.normal(k[2], (4, 8), jnp.bfloat16),
    "scale": jnp.asarray(2.5, jnp.float32),
  }


def gradient(step, p):
  """A deterministic gradient per step, in each tensor's dtype."""
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(100 + step), len(leaves))
  return treedef.unflatten(
    [
      (jax.random.normal(k, x.shape, jnp.float32) * 3.0).astype(x.dtype)
      for k, x in zip(keys, leaves)
    ]
  )


def run(tx, p=None, state=None):
  """``STEPS`` jitted steps; the flat arrays of params and states per step."""
  p = params() if p is None else p
  state = tx.init(p) if state is None else state
  update = jax.jit(tx.update)
  out = {}
  for step in range(STEPS):
    u, state = update(gradient(step, p), state, p)
    p = optax.apply_updates(p, u)
    for i, x in enumerate(jax.tree.leaves((p, state))):
      x = np.asarray(x)
      if x.dtype == jnp.bfloat16:
        x = x.view(np.uint16)
      out[f"{step}/{i}"] = x
  return out


def trajectories():
  """``run`` of every variant, keyed ``variant/step/leaf``."""
  return {
    f"{name}/{key}": value
    for name, make in VARIANTS.items()
    for key, value in run(make()).items()
  }


if __name__ == "__main__":
  np.savez_compressed(PATH, **trajectories())
