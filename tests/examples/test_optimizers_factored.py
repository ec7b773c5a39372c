"""The examples' optimizer factory passes the factored second moment on."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madam_examples import optimizers
import madam_optax

PARAMS = {
  "w": jnp.array([[0.5, -1.0, 2.0], [0.25, 2.0, -0.5]]),
  "b": jnp.zeros(3),
}
GRADS = {
  "w": jnp.array([[1.0, 2.0, 1.0], [-1.0, 1.0, 3.0]]),
  "b": jnp.array([3.0, -2.0, 1.0]),
}


@pytest.mark.parametrize("name", ["madam", "lns_madam"])
def test_factored_options_reach_the_core_transform(name):
  fmt = madam_optax.LNSFormat.spanning(127)
  params = PARAMS
  if name == "lns_madam":
    params, _ = madam_optax.lns_encode_tree(PARAMS, fmt)
  factored = optimizers.make_optimizer(
    name, 0.1, params, lns_format=fmt, factored=True, min_dim_size_to_factor=2
  )
  state = factored.init(params)
  inner = state.inner_states["multiplicative"].inner_state[0]
  assert isinstance(inner, madam_optax.ScaleByFactoredSecondMomentState)
  assert inner.row_rms_hat["w"].shape == (2,) and inner.col_rms_hat[
    "w"
  ].shape == (3,)
  # Not factored below the threshold, and not at all by default.
  for options in ({"factored": True}, {}):
    state = optimizers.make_optimizer(
      name, 0.1, params, lns_format=fmt, **options
    ).init(params)
    inner = state.inner_states["multiplicative"].inner_state[0]
    assert inner.rms_hat["w"].shape == (2, 3)  # one statistic per weight
  # The factored step moves the weights and keeps their signs.
  updates, _ = factored.update(GRADS, factored.init(params), params)
  new = optax.apply_updates(params, updates)
  assert not np.array_equal(new["w"], params["w"])
  np.testing.assert_array_equal(np.sign(new["w"]), np.sign(params["w"]))
