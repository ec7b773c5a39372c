"""``multiplicative_labels`` and ``with_additive_fallback``: leaves Madam
cannot move go to an additive optimizer (SPEC §3).

``with_additive_fallback(madam())`` runs through the whole contract from the
registry (``test_contract.py``); the Flax recipes are in ``test_flax.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax


def test_labels_need_concrete_params():
  params = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  with pytest.raises(ValueError, match="concrete initial parameters"):
    jax.jit(madam_optax.multiplicative_labels)(params)


def test_labels_by_zeros_and_by_rank():
  params = {
    "w": jnp.ones((2, 2)),
    "b": jnp.zeros(2),
    "s": jnp.ones(3),
    "none": None,
  }
  assert madam_optax.multiplicative_labels(params) == {
    "w": "multiplicative",
    "b": "additive",
    "s": "multiplicative",
    "none": None,
  }
  assert madam_optax.multiplicative_labels(params, min_ndim=2) == {
    "w": "multiplicative",
    "b": "additive",
    "s": "additive",
    "none": None,
  }


def test_partition_with_none_leaf():
  params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2), "frozen": None}
  tx = madam_optax.with_additive_fallback(
    params, madam_optax.madam(), optax.sgd(0.1)
  )
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "frozen": None}
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates["b"], -0.1)  # additive
  np.testing.assert_allclose(
    updates["w"], jnp.expm1(-0.01), rtol=1e-6
  )  # multiplicative
  assert updates["frozen"] is None
