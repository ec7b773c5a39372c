"""``multiplicative_step``: SPEC step 6, ``w * exp(-lr u sign(w))``.

Its share of the contract and of the invariants runs from the registry
(``test_contract.py``, ``test_properties.py``), after
``scale_by_second_moment``; here it also takes raw gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import madam_optax


def test_schedule_is_evaluated_at_the_step_count():
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.1})  # 0.1, 0.1, 0.01
  tx = madam_optax.multiplicative_step(schedule)
  params = {"w": jnp.array([1.0])}
  state = tx.init(params)
  factors = []
  for _ in range(3):
    updates, state = tx.update({"w": jnp.array([1.0])}, state, params)
    factors.append(float(1 + updates["w"][0]))
  np.testing.assert_allclose(factors, np.exp([-0.1, -0.1, -0.01]), rtol=1e-6)


def test_minimises_a_parabola_on_raw_gradients_inside_a_chain():
  tx = optax.chain(optax.identity(), madam_optax.multiplicative_step())
  target = jnp.array([0.5, -2.0, 3.0])
  params = {"w": jnp.array([1.0, -1.0, 1.0])}
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  initial = loss(params)
  for _ in range(300):
    params, state = step(params, state)
  assert loss(params) < 0.1 * initial
