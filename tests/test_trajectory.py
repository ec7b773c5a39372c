"""Today's code reproduces, bit for bit, the saved trajectory of Madam's float
variants (``tests/data/madam_trajectory.npz``, written by
``tests/trajectory.py``): a guard for changes of the state's format or of
where the weight bound is computed, which must keep trajectories
bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

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
