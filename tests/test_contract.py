"""The Optax contract, for every transform in the registry (``transforms.py``).

The checks of Optax contrib's common test matrix, applied to our transforms:
convergence on a parabola, Rosenbrock, a matrix and a mixed-tensor problem;
``optax.tree.map_params`` over the state; extra keyword arguments accepted by
``update``; no recompilation on a second call; ``inject_hyperparams`` giving
the plain call's result; learning-rate schedules; parameter and state dtypes
kept (float16/bfloat16/float32/float64 params, int8/int16 codes) and stable
under ``lax.cond``; ``optax.MultiSteps``; ``optax.MaskedNode`` and ``None``
leaves. That the state keeps its sharding through ``update`` is checked with
the other sharding tests, in ``test_sharding.py``.

Each part is completed into a whole optimizer as the registry says (e.g.
``scale_by_second_moment`` followed by the learning rate). Cases known to
fail a check today run it as a strict xfail (the registry's
``known_failures``).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transforms
from transforms import BY_NAME
from transforms import EXTRA_ARGS
from transforms import MAP_PARAMS

# Tests here init on all-zero leaves on purpose (zeros stay zero): the
# warning about them is tested in test_zero_leaves.py.
pytestmark = pytest.mark.filterwarnings(
  "ignore:.*all-zero parameter leaves at init:UserWarning"
)


# ------------------------------------------------------------- convergence

# Contrib's targets start at zero or cross zero. A multiplicative update
# cannot: a weight never changes sign and a zero weight never moves. So every
# start here is non-zero with the optimum's signs, and every optimum lies
# inside the per-tensor bound p_scale * RMS(w0) (p_scale = 3) and above the
# LNS grid's smallest magnitude (bound * exp(-4)). The problems are
# independent leaves of one tree, minimised in one run.
START = {
  "parabola": jnp.array([1.0, -3.0, 2.0]),
  "rosenbrock": jnp.array([0.5, 0.25]),
  "matrix": jnp.array([[2.0, -1.0], [0.5, 3.0]]),
  "mixed": (jnp.array([0.5, -2.0, 1.0]), jnp.array([[2.0, 1.0], [-0.5, 0.5]])),
}
OPTIMUM = {
  "parabola": jnp.array([2.0, -1.0, 0.5]),
  "rosenbrock": jnp.array([1.0, 1.0]),
  "matrix": jnp.array([[3.0, -2.0], [1.0, 4.0]]),
  "mixed": (jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.5], [-1.0, 1.0]])),
}
PROBLEMS = tuple(START)
STEPS = 5000


def total_loss(w):
  """Squared distance to the optimum, plus Rosenbrock (a=1, b=100)."""
  x, y = w["rosenbrock"]
  rosenbrock = (1 - x) ** 2 + 100 * (y - x**2) ** 2
  quadratic = [
    jnp.sum((a - b) ** 2)
    for name in ("parabola", "matrix", "mixed")
    for a, b in zip(jax.tree.leaves(w[name]), jax.tree.leaves(OPTIMUM[name]))
  ]
  return rosenbrock + sum(quadratic)


@functools.cache
def converged(name):
  """The decoded weights after STEPS steps of the case at its defaults.

  The rate decays (cosine from 0.01) as the paper advises once training
  jitters. Codes are int16 (0.001 in log|w| per level): int8's 0.03 cannot
  resolve Rosenbrock's valley to 3e-2.
  """
  case = BY_NAME[name]
  fmt = case.format_for("int16")
  params, decode = case.encode(START, fmt)
  tx = case.optimizer(
    params,
    learning_rate=optax.cosine_decay_schedule(0.01, STEPS),
    defaults=True,
    fmt=fmt,
    **case.converge,
  )

  def step(carry, _):
    params, state = carry
    grads = jax.grad(total_loss)(decode(params))
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, STEPS))(
    (params, tx.init(params))
  )
  return decode(params)


@pytest.mark.parametrize(
  "case, problem",
  [
    case.param(f"converges_{problem}", problem)
    for case in transforms.CASES
    for problem in PROBLEMS
  ],
)
def test_converges(case, problem):
  """Contrib's tolerance (3e-2 relative and absolute) at the optimum."""
  chex.assert_trees_all_close(
    converged(case.name)[problem], OPTIMUM[problem], rtol=3e-2, atol=3e-2
  )


# ------------------------------------------------------------------ helpers


def run(tx, params, case, steps=5, **extra):
  """``steps`` jitted steps on the case's example gradients."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, case.example_grads(params, i))
  return params, state


def is_injected(x):
  """An ``inject_hyperparams`` state (its class differs across versions)."""
  return hasattr(x, "hyperparams") and hasattr(x, "inner_state")


@functools.cache
def plain_run(name):
  """Five steps of the case as registered: what the variants must equal."""
  case = BY_NAME[name]
  params = case.example_params()
  return run(case.optimizer(params), params, case)


# ------------------------------------------------------------ the contract


@pytest.mark.parametrize("case", transforms.cases(check=EXTRA_ARGS))
def test_update_accepts_extra_keyword_arguments(case):
  """``optax.chain`` passes keyword arguments on to every part's update."""
  params = case.example_params()
  tx = case.transform(params)
  params, state = run(
    tx,
    params,
    case,
    steps=2,
    unexpected_extra_args_your_optimizer_doesnt_expect=1,
    value=jnp.array(1.0),
  )
  chex.assert_tree_all_finite(jax.tree.leaves(state))


@pytest.mark.parametrize("case", transforms.cases())
def test_inject_hyperparams_matches_plain_call(case):
  params = case.example_params()
  plain, plain_state = plain_run(case.name)
  injected, injected_state = run(
    case.optimizer(params, inject=True), params, case
  )
  chex.assert_trees_all_close(plain, injected, rtol=1e-6)
  # Contrib compares the states too: the injected one holds the plain one.
  inner = jax.tree.map(
    lambda x: x.inner_state if is_injected(x) else x,
    injected_state,
    is_leaf=is_injected,
  )
  chex.assert_trees_all_close(plain_state, inner, rtol=1e-6)
  # Every hyperparameter is really injected (held in the state as an array).
  found = [
    x
    for x in jax.tree.leaves(injected_state, is_leaf=is_injected)
    if is_injected(x)
  ]
  assert len(found) == 1
  assert set(case.hyperparams) == set(found[0].hyperparams)


@pytest.mark.parametrize(
  "case", transforms.cases(where=lambda case: case.takes_learning_rate)
)
def test_learning_rate_schedule_matches_constant(case):
  params = case.example_params()
  schedule = optax.constant_schedule(case.hyperparams["learning_rate"])
  scheduled, _ = run(
    case.optimizer(params, learning_rate=schedule), params, case
  )
  chex.assert_trees_all_close(scheduled, plain_run(case.name)[0], rtol=1e-6)


def dtype_params():
  """Each float case once, on a tree of all four float dtypes; each code case
  once per codes' dtype."""
  return [
    case.param(None, dtype)
    for case in transforms.CASES
    for dtype in (case.dtypes if case.codes else ["mixed_floats"])
  ]


def params_of_dtype(case, dtype):
  """The case's example params; for "mixed_floats" one tensor per dtype
  (the kernel, the bias, the scalar and the kernel again), but for the
  dtypes a case's ``state_dtype`` cannot hold (it refuses them: see
  ``test_robustness.py``)."""
  if dtype != "mixed_floats":
    return case.example_params(dtype)
  weights = transforms.example_weights()
  tensors = (
    weights["dense"]["kernel"],
    weights["dense"]["bias"],
    weights["scale"],
    weights["dense"]["kernel"].T,
  )
  state_dtype = case.static.get("state_dtype")
  return {
    d: w.astype(d)
    for d, w in zip(transforms.FLOAT_DTYPES, tensors)
    if state_dtype is None
    or jnp.finfo(state_dtype).maxexp >= jnp.finfo(d).maxexp
  }


@pytest.mark.parametrize("case, dtype", dtype_params())
def test_dtypes_kept_stable_under_cond_and_compiled_once(case, dtype):
  """Updates, params and state keep their dtypes, also inside ``lax.cond``;
  the step is traced once (no recompilation on the second call).

  The float dtypes (float16, bfloat16, float32, float64) share one tree, with
  float64 enabled: each tensor keeps its own dtype.
  """
  with jax.enable_x64(dtype == "mixed_floats"):
    params = params_of_dtype(case, dtype)
    tx = case.optimizer(params, fmt=case.format_for(dtype))
    state = tx.init(params)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads, pred):
      def do(operands):
        params, state = operands
        updates, new_state = tx.update(grads, state, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        return optax.apply_updates(params, updates), new_state

      # lax.cond demands identical dtypes (and weak types) in both branches.
      return jax.lax.cond(pred, do, lambda x: x, (params, state))

    for i, pred in enumerate([True, False, True]):
      new_params, new_state = step(
        params, state, case.example_grads(params, i), pred
      )
      chex.assert_trees_all_equal_dtypes(new_params, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      params, state = new_params, new_state
    chex.assert_tree_all_finite(
      jax.tree.map(lambda p: p.astype(jnp.float32), params)
    )


@pytest.mark.parametrize("case", transforms.cases())
def test_multisteps_accumulates_then_applies(case):
  params = case.example_params()
  g0, g1 = case.example_grads(params, 0), case.example_grads(params, 1)
  every_k = optax.MultiSteps(case.optimizer(params), every_k_schedule=2)
  plain = case.optimizer(params)

  @jax.jit
  def updates():
    state = every_k.init(params)
    u0, state = every_k.update(g0, state, params)
    u1, state = every_k.update(g1, state, params)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    return u0, u1, plain.update(mean_grad, plain.init(params), params)[0]

  u0, u1, expected = updates()
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, params))
  # The new weights (an update that lands on a grid point is the difference
  # of two close numbers: compare what it gives).
  chex.assert_trees_all_close(
    optax.apply_updates(params, u1),
    optax.apply_updates(params, expected),
    rtol=1e-6,
  )


@pytest.mark.parametrize("case", transforms.cases())
def test_masked_with_masked_node_and_none_leaves(case):
  weights = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0]), "c": None}
  params, _ = case.encode(weights)
  mask = {"a": True, "b": False, "c": None}
  tx = optax.masked(case.optimizer(params), mask)
  state = tx.init(params)
  grads = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0]), "c": None}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["c"] is None
  np.testing.assert_array_equal(updates["b"], grads["b"])  # passed through
  assert jnp.all(updates["a"] != 0)
  # Every case keeps per-leaf state: it holds a MaskedNode for "b".
  leaves = jax.tree.leaves(
    state, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )
  assert any(isinstance(x, optax.MaskedNode) for x in leaves)


@pytest.mark.parametrize("case", transforms.cases(check=MAP_PARAMS))
def test_map_params_over_the_state(case):
  """Frameworks derive the state's shardings from the params' this way."""
  params = case.example_params()
  tx = case.optimizer(params)
  state = tx.init(params)
  chex.assert_trees_all_equal(
    optax.tree.map_params(tx, lambda v: v, state), state
  )
  marked = optax.tree.map_params(
    tx, lambda v: "param", state, transform_non_params=lambda v: "other"
  )
  assert "param" in jax.tree.leaves(marked)  # the second moment, per param
