"""``scale_by_second_moment``: SPEC steps 2-4, without epsilon.

Its share of the contract and of the invariants runs from the registry
(``test_contract.py``, ``test_properties.py``).
"""

from hypothesis import given
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import madam_optax

N = 12
F32_MAX = float(np.finfo(np.float32).max)
# XLA flushes float32 subnormals to zero; (1 - b2)**0.5 * g is subnormal for
# |g| below about 4e-37, and such gradients count as zero (documented).
normal_f32 = st.floats(
  -F32_MAX, F32_MAX, allow_nan=False, allow_infinity=False, width=32
).filter(lambda x: x == 0 or abs(x) >= 1e-30)


@jax.jit
def _first_normalised(g):
  tx = madam_optax.scale_by_second_moment()
  return tx.update(g, tx.init(g))[0]


@given(hnp.arrays(np.float32, (N,), elements=normal_f32))
def test_first_normalised_gradient_is_exactly_sign(g):
  u = _first_normalised({"g": g})
  np.testing.assert_array_equal(np.asarray(u["g"]), np.sign(g))


def test_first_step_is_exactly_sign_over_forty_decades():
  """Gradients from 1e-20 to 1e20 in one tree, and an all-zero tensor."""
  rng = np.random.default_rng(5)
  shapes = {
    "scalar": (),
    "vector": (7,),
    "matrix": (16, 9),
    "conv": (3, 3, 4, 5),
    "all_zero": (6,),
  }
  g = {
    k: (rng.standard_normal(s) * 10.0 ** rng.uniform(-20, 20, s)).astype(
      np.float32
    )
    for k, s in shapes.items()
  }
  g["all_zero"] = np.zeros(shapes["all_zero"], np.float32)
  tx = madam_optax.scale_by_second_moment()
  u, _ = tx.update(g, tx.init(g))
  for k in g:
    np.testing.assert_array_equal(np.asarray(u[k]), np.sign(g[k]), err_msg=k)


def test_integer_gradients_are_rejected():
  tx = madam_optax.scale_by_second_moment()
  with pytest.raises(ValueError, match=r"updates leaf \['w'\].*int32"):
    tx.update({"w": jnp.array([1, 2])}, tx.init({"w": jnp.ones(2)}))
