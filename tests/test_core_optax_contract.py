"""The Optax contract, for each core transform and for `madam`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), dtype),
                "bias": jnp.asarray(rng.standard_normal(3), dtype)},
      "scale": jnp.asarray(1.5, dtype),
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _run(tx, params, steps=5, jit=True, **extra):
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  for i in range(steps):
    params, state = step(params, state, _grads(params, i))
  return params, state


# Each factory with the hyperparameters that can be injected.
TRANSFORMS = {
    "madam": (madam_optax.madam,
              {"learning_rate": 0.03, "p_scale": 2.0, "g_bound": 0.7, "b2": 0.9}),
    "scale_by_second_moment": (madam_optax.scale_by_second_moment, {"b2": 0.9}),
    "multiplicative_step": (madam_optax.multiplicative_step,
                            {"learning_rate": 0.05}),
    "clip_weight_magnitude": (madam_optax.clip_weight_magnitude, {"p_scale": 0.8}),
}


def _chained(name, tx):
  """Makes every part a complete optimizer (an update of sensible sign/size)."""
  if name == "scale_by_second_moment":
    return optax.chain(tx, optax.scale(-0.01))
  if name == "clip_weight_magnitude":
    return optax.chain(optax.sgd(0.5), tx)
  return tx


@pytest.mark.parametrize("name", TRANSFORMS)
def test_works_inside_optax_chain_and_minimises_a_parabola(name):
  factory, _ = TRANSFORMS[name]
  tx = optax.chain(optax.identity(), _chained(name, factory()))
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
  if name == "clip_weight_magnitude":  # bound 3*RMS(1, -1, 1) = 3 holds
    assert jnp.all(jnp.abs(params["w"]) <= 3.0)
  assert loss(params) < 0.1 * initial


def test_madam_minimises_rosenbrock():
  params = {"xy": jnp.array([1.5, 2.0])}   # same signs as the optimum (1, 1)

  def rosenbrock(p):
    x, y = p["xy"]
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2

  # Constant lr 0.01 "jitters" near the optimum (loss ~2e-2); decaying it, as
  # the paper advises, converges.
  tx = madam_optax.madam(learning_rate=optax.cosine_decay_schedule(0.01, 10_000))
  state = tx.init(params)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(
      lambda c: jax.lax.scan(step, c, None, length=10_000))((params, state))
  assert rosenbrock(params) < 1e-3


@pytest.mark.parametrize("name", TRANSFORMS)
def test_no_recompilation_on_second_call(name):
  factory, _ = TRANSFORMS[name]
  tx = _chained(name, factory())
  params = _params()
  state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(3):
    params, state = step(params, state, _grads(params, i))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_inject_hyperparams_matches_plain_call(name):
  factory, hyper = TRANSFORMS[name]
  params = _params()
  plain, plain_state = _run(_chained(name, factory(**hyper)), params)
  injected_tx = optax.inject_hyperparams(factory)(**hyper)
  injected, injected_state = _run(_chained(name, injected_tx), params)
  chex.assert_trees_all_close(plain, injected, rtol=1e-6)
  # Every hyperparameter is really injectable (held in state as an array).
  found = [x for x in jax.tree.leaves(
      injected_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(x, "hyperparams")]
  assert len(found) == 1 and set(hyper) <= set(found[0].hyperparams)


def test_inject_hyperparams_learning_rate_can_change_between_steps():
  params = _params()
  tx = optax.inject_hyperparams(madam_optax.madam)(learning_rate=0.01)
  state = tx.init(params)
  grads = _grads(params, 0)
  updates_small, _ = tx.update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  updates_big, _ = tx.update(grads, state, params)
  ratio = jnp.abs(updates_big["scale"] / updates_small["scale"])
  assert 9.0 < ratio < 11.0


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


def test_multisteps_accumulates_then_applies():
  params = _params()
  every_k = optax.MultiSteps(madam_optax.madam(), every_k_schedule=2)
  state = every_k.init(params)
  g0, g1 = _grads(params, 0), _grads(params, 1)
  u0, state = every_k.update(g0, state, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, params))
  u1, state = every_k.update(g1, state, params)
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  plain = madam_optax.madam()
  expected, _ = plain.update(mean_grad, plain.init(params), params)
  chex.assert_trees_all_close(u1, expected, rtol=1e-6)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_masked_with_masked_node_and_none_leaves(name):
  factory, _ = TRANSFORMS[name]
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0]), "c": None}
  mask = {"a": True, "b": False, "c": None}
  tx = optax.masked(_chained(name, factory()), mask)
  state = tx.init(params)
  grads = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0]), "c": None}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["c"] is None
  np.testing.assert_array_equal(updates["b"], grads["b"])  # passed through
  assert jnp.all(updates["a"] != 0)
  if name != "multiplicative_step":  # the others keep per-leaf state
    # The inner state holds a MaskedNode for "b".
    leaves = jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    assert any(isinstance(x, optax.MaskedNode) for x in leaves)


def test_partition_with_none_leaf():
  params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2), "frozen": None}
  tx = madam_optax.with_additive_fallback(params, madam_optax.madam(), optax.sgd(0.1))
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "frozen": None}
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates["b"], -0.1)          # additive
  np.testing.assert_allclose(updates["w"], jnp.expm1(-0.01), rtol=1e-6)  # multiplicative
  assert updates["frozen"] is None


def test_apply_if_finite_skips_non_finite_steps():
  params = _params()
  tx = optax.apply_if_finite(madam_optax.madam(), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.notfinite_count) == 1
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  assert int(state.notfinite_count) == 0
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_unexpected_keyword_arguments_are_ignored(name):
  factory, _ = TRANSFORMS[name]
  tx = factory()
  params = _params()
  updates, _ = tx.update(_grads(params, 0), tx.init(params), params,
                         loss=jnp.array(1.0), unexpected="ignored")
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_param_dtypes_preserved_and_state_stable_in_cond(name, dtype):
  factory, _ = TRANSFORMS[name]
  with jax.enable_x64(dtype == jnp.float64):
    tx = _chained(name, factory())
    params = _params(dtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads, pred):
      def do(operands):
        params, state = operands
        updates, new_state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), new_state
      # lax.cond demands identical dtypes (and weak types) in both branches.
      return jax.lax.cond(pred, do, lambda x: x, (params, state))

    for i, pred in enumerate([True, False, True]):
      new_params, new_state = step(params, state, _grads(params, i), pred)
      chex.assert_trees_all_equal_dtypes(new_params, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      params, state = new_params, new_state
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("state_dtype", [jnp.bfloat16, jnp.float32])
def test_state_dtype_is_selectable(state_dtype):
  params = _params()
  tx = madam_optax.madam(state_dtype=state_dtype)
  _, state = _run(tx, params)
  for leaf in jax.tree.leaves(state[0].rms):
    assert leaf.dtype == state_dtype
  # bf16 state tracks the fp32 trajectory closely.
  fp32, _ = _run(madam_optax.madam(), params)
  bf16, _ = _run(tx, params)
  chex.assert_trees_all_close(fp32, bf16, rtol=2e-2)


def test_state_is_one_buffer_plus_scalars():
  params = _params()
  state = madam_optax.madam().init(params)
  second_moment, clip_state, step_state, bound_state = state
  chex.assert_trees_all_equal_shapes(second_moment.rms, params)
  others = (second_moment.count, clip_state, step_state, bound_state)
  assert all(x.ndim == 0 for x in jax.tree.leaves(others))
