"""Today's code reproduces, bit for bit, the saved trajectory of Madam's float
variants (``tests/data/madam_trajectory.npz``, written by
``tests/trajectory.py``): a guard for changes of the state's format or of
where the weight bound is computed, which must keep trajectories
bit-identical."""

from __future__ import annotations

import jax
from jax.tree_util import tree_leaves_with_path
import numpy as np
import pytest

from tests import reference
from tests import trajectory

SAVED = dict(np.load(trajectory.PATH))


@pytest.mark.parametrize("name", sorted(trajectory.VARIANTS))
def test_reproduces_the_saved_trajectory_bit_for_bit(name):
  got = trajectory.run(trajectory.VARIANTS[name]())
  want = {
    k[len(name) + 1 :]: v for k, v in SAVED.items() if k.startswith(f"{name}/")
  }
  assert sorted(got) == sorted(want)
  for key, value in got.items():
    np.testing.assert_array_equal(
      value, want[key], err_msg=f"{name} {key}", strict=True
    )


@pytest.mark.parametrize(
  "name, settings",
  [
    ("madam", {"lr": 0.05}),
    ("madam_p_scale", {"lr": 0.05, "p_scale": 1.5}),
    ("b1", {"lr": 0.05, "b1": 0.9}),
  ],
)
def test_the_saved_trajectory_follows_the_float64_reference(name, settings):
  """Every float32 weight of the saved trajectory within 3e-7 (relative) of
  SPEC's Madam in float64 (``tests/reference.py``). The state before
  ``rms_hat`` reached 5.6e-7 here (its bias correction lost digits to
  cancellation in float32); today's 1.2e-7."""
  params = trajectory.params()
  paths = [jax.tree_util.keystr(k) for k, _ in tree_leaves_with_path(params)]
  as_dict = lambda tree: {  # noqa: E731
    p: np.asarray(x, np.float64)
    for p, (_, x) in zip(paths, tree_leaves_with_path(tree))
  }
  grads = [
    as_dict(trajectory.gradient(step, params))
    for step in range(trajectory.STEPS)
  ]
  history = reference.madam_reference(as_dict(params), grads, **settings)
  for step, want in enumerate(history):
    for i, path in enumerate(paths):
      if np.dtype(jax.tree.leaves(params)[i].dtype) != np.float32:
        continue  # bfloat16 weights round to their own grid
      got = SAVED[f"{name}/{step}/{i}"].astype(np.float64)
      np.testing.assert_allclose(
        got, want[path], rtol=3e-7, err_msg=f"{name} step {step} {path}"
      )
