"""What frameworks do with an optimizer, on every public float transform.

The patterns of Optax's own contract tests (``optax/contrib/_common_test.py``
and ``optax/_src/sharding_test.py``), written here for the registry
(``transforms.py``): ``init`` on abstract input (``jax.ShapeDtypeStruct``),
``optax.tree.map_params`` with the parameters' partition specs, and the
state's shardings from :func:`madam_optax.state_shardings` on the eight
simulated devices, with a compiled update that communicates nothing. Also:
states with the per-tensor bounds in a flat tuple, as the earlier code kept
them, still update the same, and an Orbax checkpoint of the earlier format
(flat bounds, and the second moment as ``rms = sqrt(v)``) fails loudly when
restored into today's state.
"""

import collections
import re

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import collectives_in
from meshes import make_mesh
import numpy as np
import optax
import pytest
import transforms
from transforms import BY_NAME

import madam_optax

FLOAT_CASES = transforms.cases(codes=False)

# name: (shape, spec over the ("data", "fsdp") mesh); a matrix to factor.
LAYOUT = {
  "kernel": ((16, 32), P("data", "fsdp")),
  "bias": ((32,), P("fsdp")),
  "scale": ((), P()),
}


def abstract(tree):
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )


def is_abstract(x):
  return isinstance(x, jax.ShapeDtypeStruct)


def shapes(tree):
  return jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), tree)


def step(tx):
  def run(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return run


# ------------------------------------------------------- init from shapes


@pytest.mark.parametrize("case", FLOAT_CASES)
def test_init_from_shapes(case):
  """``tx.init`` on ``jax.ShapeDtypeStruct`` leaves (Optax's
  ``test_init_with_abstract_input``): the state has the structure, shapes
  and dtypes of the state from arrays. Its leaves are arrays (the same
  values) except the weight bounds, which need the weights' values: they
  are abstract, and an update refuses them, naming the fix."""
  params = case.example_params()
  tx = case.optimizer(params)
  from_arrays = tx.init(params)
  from_shapes = tx.init(abstract(params))
  chex.assert_trees_all_equal_structs(from_shapes, from_arrays)
  assert shapes(from_shapes) == shapes(from_arrays)
  pairs = zip(jax.tree.leaves(from_shapes), jax.tree.leaves(from_arrays))
  concrete = [(s, a) for s, a in pairs if not is_abstract(s)]
  chex.assert_trees_all_equal(*zip(*concrete))
  grads = case.example_grads(params, 0)
  if any(is_abstract(x) for x in jax.tree.leaves(from_shapes)):
    with pytest.raises(ValueError, match="initialised from shapes"):
      tx.update(grads, from_shapes, params)
  else:  # a complete state: the same step as from arrays
    chex.assert_trees_all_equal(
      step(tx)(params, grads, from_shapes), step(tx)(params, grads, from_arrays)
    )


@pytest.mark.parametrize(
  "make",
  [
    lambda: madam_optax.madam(max_magnitude=1.5),
    lambda: madam_optax.madam(max_magnitude=1.5, b1=0.9),
    lambda: madam_optax.madam(
      max_magnitude=1.5, factored=True, min_dim_size_to_factor=2
    ),
    lambda: optax.chain(
      madam_optax.scale_by_second_moment(),
      madam_optax.multiplicative_step(0.01),
      madam_optax.clip_weight_magnitude(max_magnitude=1.5),
    ),
  ],
  ids=["madam", "madam_b1", "madam_factored", "chain"],
)
def test_a_fixed_bound_makes_init_from_shapes_complete(make):
  """With the bound given (``max_magnitude``) nothing in the state depends
  on the weights' values: ``init`` from shapes alone is the state from
  arrays, and steps the same (``docs/distributed.md``)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  tx = make()
  from_shapes = tx.init(abstract(params))
  assert not any(is_abstract(x) for x in jax.tree.leaves(from_shapes))
  chex.assert_trees_all_equal(from_shapes, tx.init(params))
  chex.assert_trees_all_equal(
    step(tx)(params, grads, from_shapes),
    step(tx)(params, grads, tx.init(params)),
  )


@pytest.mark.parametrize("name", ["madam", "madam_factored", "madam_b1"])
def test_eval_shape_of_init_and_inject_hyperparams(name):
  """``jax.eval_shape(tx.init, ...)``, as frameworks build restore targets,
  also through ``optax.inject_hyperparams`` (whose own init converts leaves
  to arrays, so it needs ``eval_shape`` for abstract input)."""
  case = BY_NAME[name]
  params = case.example_params()
  for inject in (False, True):
    tx = case.optimizer(params, inject=inject)
    assert shapes(jax.eval_shape(tx.init, abstract(params))) == shapes(
      tx.init(params)
    )


# ------------------------------------------------------------ map_params


@pytest.mark.parametrize("case", FLOAT_CASES)
def test_map_params_gives_each_per_tensor_entry_its_spec(case):
  """Optax's partition-spec recipe: ``map_params(tx, lambda _, s: s, state,
  specs, transform_non_params=...)`` runs and gives a spec to every
  leaf of the state; the second moments and bounds are found as
  per-parameter entries (the state's per-tensor entries are params-shaped
  trees)."""
  params = case.example_params()
  tx = case.optimizer(params)
  state = tx.init(params)
  specs = jax.tree.map(lambda p: P(*([None] * p.ndim)), params)
  # optax.partition's states hold MaskedNodes where params hold tensors:
  # they are leaves for map_params, and stay as they are.
  mapped = optax.tree.map_params(
    tx,
    lambda v, spec: v if isinstance(v, optax.MaskedNode) else spec,
    state,
    specs,
    transform_non_params=lambda _: "other",
    is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)),
  )
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  leaves = jax.tree.leaves(mapped, is_leaf=is_spec)
  assert len(leaves) == len(jax.tree.leaves(state))
  assert sum(map(is_spec, leaves)) >= len(jax.tree.leaves(params))
  bounds = [
    x
    for x in jax.tree.leaves(
      state,
      is_leaf=lambda x: isinstance(
        x, (madam_optax.ClipWeightMagnitudeState, madam_optax.LogQuantiseState)
      ),
    )
    if hasattr(x, "max_magnitude")
  ]
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  for bound_state in bounds:  # a params-shaped tree of scalars
    assert jax.tree.structure(
      bound_state.max_magnitude, is_leaf=masked
    ) == jax.tree.structure(params)


# -------------------------------------------------------- state_shardings


def sharded_params(mesh):
  keys = jax.random.split(jax.random.key(0), len(LAYOUT))
  return {
    name: jax.device_put(
      jax.random.normal(key, shape, jnp.float32) + 2.0,
      NamedSharding(mesh, spec),
    )
    for key, (name, (shape, spec)) in zip(keys, sorted(LAYOUT.items()))
  }


def copies_in(text):
  return len(re.findall(r"= \S+ copy\(", text))


def single_device_copies(tx, params, state):
  """Copies in the same donated step on one device (a bfloat16 state or a
  carried PRNG key has some there too)."""
  device = jax.devices()[0]
  params, state = jax.device_put((params, state), device)
  one = jax.tree.map(
    lambda _: jax.sharding.SingleDeviceSharding(device), params
  )
  state_one = jax.tree.map(
    lambda _: jax.sharding.SingleDeviceSharding(device), state
  )
  compiled, _ = compiled_step(tx, params, one, state, state_one)
  return copies_in(compiled.as_text())


def compiled_step(tx, params, param_sh, state, state_sh):
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  return (
    jax.jit(
      step(tx),
      in_shardings=(param_sh, param_sh, state_sh),
      out_shardings=(param_sh, state_sh),
      donate_argnums=(0, 2),
    )
    .lower(params, grads, state)
    .compile()
  ), grads


# Every case on an Explicit mesh (shardings in the types); two on Auto axes.
SHARDING_CASES = [
  (case, "Explicit") for case in transforms.CASES if not case.codes
] + [(BY_NAME[name], "Auto") for name in ("madam", "madam_factored")]


@pytest.mark.parametrize(
  "case, axis_type",
  SHARDING_CASES,
  ids=[f"{case}-{axis}" for case, axis in SHARDING_CASES],
)
def test_state_shardings_shard_a_real_state_and_the_update_is_local(
  eight_devices, case, axis_type
):
  """``madam_optax.state_shardings(tx, params)``: ``jax.jit(tx.init,
  out_shardings=...)`` gives a state sharded that way (second moments like
  their parameter, factored statistics along the dimension they keep,
  bounds and counts replicated), and the compiled, donated update has no
  collective (a factored one only its statistics' means) and no copy that
  the same step on one device does not have."""
  mesh = make_mesh(eight_devices, getattr(jax.sharding.AxisType, axis_type))
  with jax.set_mesh(mesh):
    params = sharded_params(mesh)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    tx = case.optimizer(params)
    state_sh = madam_optax.state_shardings(tx, params)
    # The same from shapes alone.
    assert madam_optax.state_shardings(tx, abstract(params)) == state_sh
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    chex.assert_trees_all_equal_structs(state, state_sh)
    for path, leaf, sharding in zip(
      [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]],
      jax.tree.leaves(state),
      jax.tree.leaves(state_sh),
    ):
      where = jax.tree_util.keystr(path)
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), where
      if leaf.ndim == 0:
        assert sharding.is_fully_replicated, where
    # Every per-parameter entry of kernel and bias is split (not replicated).
    sharded = [
      s for s in jax.tree.leaves(state_sh) if not s.is_fully_replicated
    ]
    assert len(sharded) >= 2
    compiled, grads = compiled_step(tx, params, param_sh, state, state_sh)
    text = compiled.as_text()
    assert collectives_in(text) == (["all-reduce"] if case.factored else [])
    host = jax.device_get((params, state))
    new_params, new_state = compiled(params, grads, state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state_sh)):
      assert a.sharding.is_equivalent_to(b, a.ndim)
    assert all(
      bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new_params)
    )
  assert copies_in(text) == single_device_copies(tx, *host)


def test_factored_statistics_drop_the_averaged_axis_from_the_spec(
  eight_devices,
):
  """The row statistic of a ``(16, 32)`` kernel over ``("data", "fsdp")``
  averages the columns: ``P("data")``; the column statistic ``P("fsdp")``.
  Plain ``map_params`` with the parameter's spec would give both the
  kernel's two-axis spec."""
  mesh = make_mesh(eight_devices)
  params = sharded_params(mesh)
  tx = BY_NAME["madam_factored"].optimizer(params)
  moments = madam_optax.state_shardings(tx, params)[0]
  assert moments.row_rms_hat["kernel"].spec == P("data")
  assert moments.col_rms_hat["kernel"].spec == P("fsdp")
  assert moments.rms_hat["kernel"].spec == P()  # its placeholder scalar
  assert moments.rms_hat["bias"].spec == P("fsdp")


def test_a_replicated_state_would_communicate(eight_devices):
  """The checks above can fail: with the state replicated instead (what a
  state sharded by hand often is), the same update gathers it."""
  mesh = make_mesh(eight_devices, jax.sharding.AxisType.Auto)
  params = sharded_params(mesh)
  param_sh = jax.tree.map(lambda p: p.sharding, params)
  tx = madam_optax.madam()
  state = tx.init(params)
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  state = jax.device_put(state, replicated)
  compiled, _ = compiled_step(tx, params, param_sh, state, replicated)
  assert collectives_in(compiled.as_text()) != []


def test_state_shardings_names_a_parameter_without_sharding():
  params = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(ValueError, match=r"parameter \['w'\] has no sharding"):
    madam_optax.state_shardings(madam_optax.madam(), params)


# --------------------------------------------------- the earlier format


def flat_bounds(state):
  """``state`` with its bounds as the earlier code kept them: a flat tuple."""
  kinds = (madam_optax.ClipWeightMagnitudeState, madam_optax.LogQuantiseState)
  return jax.tree.map(
    lambda s: (
      s._replace(max_magnitude=tuple(jax.tree.leaves(s.max_magnitude)))
      if isinstance(s, kinds)
      else s
    ),
    state,
    is_leaf=lambda s: isinstance(s, kinds),
  )


@pytest.mark.parametrize(
  "name",
  ["madam", "madam_factored", "clip_weight_magnitude", "log_quantise_nearest"],
)
def test_a_state_in_the_0_2_format_updates_the_same(name):
  case = BY_NAME[name]
  params = case.example_params()
  tx = case.optimizer(params)
  state = tx.init(params)
  old = flat_bounds(state)
  assert jax.tree.structure(old) != jax.tree.structure(state)
  grads = case.example_grads(params, 0)
  new_params, new_state = jax.jit(step(tx))(params, grads, state)
  old_params, old_state = jax.jit(step(tx))(params, grads, old)
  chex.assert_trees_all_equal(old_params, new_params)
  chex.assert_trees_all_equal(
    jax.tree.leaves(old_state), jax.tree.leaves(new_state)
  )


def earlier_format(state):
  """``state`` as the code before 0.2.0 saved it: bounds in a flat tuple and
  the second moments under their earlier names (``rms``, ``row_rms``,
  ``col_rms``; the values are not converted, only the format matters)."""

  def earlier(s):
    fields = [f.removesuffix("_hat") for f in s._fields]
    return collections.namedtuple(type(s).__name__, fields)(*s)

  hat = lambda s: hasattr(s, "_fields") and "rms_hat" in s._fields  # noqa: E731
  return jax.tree.map(
    lambda s: earlier(s) if hat(s) else s, flat_bounds(state), is_leaf=hat
  )


@pytest.mark.parametrize("name", ["madam", "madam_b1", "madam_factored"])
def test_an_earlier_checkpoint_fails_loudly_into_todays_state(name, tmp_path):
  """A checkpoint of the earlier format restored into today's state is
  Orbax's error naming the renamed fields, never a silent restore of
  ``sqrt(v)`` as ``sqrt(v_hat)``; ``docs/checkpointing.md`` converts one
  (its snippet runs in ``tests/test_docs.py``)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  case = BY_NAME[name]
  params = case.example_params()
  tx = case.optimizer(params)
  state = tx.init(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "earlier", earlier_format(state))
  checkpointer.wait_until_finished()
  with pytest.raises(ValueError, match=r"rms_hat(.|\n)*max_magnitude"):
    checkpointer.restore(tmp_path / "earlier", state)
