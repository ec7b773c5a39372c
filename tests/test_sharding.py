"""Madam on a device mesh: shardings, equality with one device, no collectives.

Runs on the 8 simulated CPU devices that ``conftest.py`` requests. Every test
uses a (2, 4) mesh with axes ``('data', 'fsdp')`` and parameters that are
sharded 8 ways (over both axes), so each device holds exactly 1/8 of every
tensor.

What is proved here (issue: pod-scale training):

* for every transform in the registry (``transforms.py``; the sharding part
  of the Optax contract, as in Optax contrib's ``_sharding_test.py``): the
  optimizer state carries the same sharding as the parameters it belongs to
  (eager ``init``), ``jax.jit(init)`` gives it the same types, ``update``
  keeps the state's and the params' sharded types, and the compiled update
  contains no collective (all-reduce, all-gather, reduce-scatter,
  collective-permute, all-to-all);
* ``jax.jit(init)`` with and without ``out_shardings`` keeps the shardings;
* a sharded run of 20 steps equals the single-device run to 1e-6 relative
  (the per-tensor bound at ``init`` is a sum whose order depends on the
  layout), and from the same initial state the 20 steps are bitwise equal;
* the collective check finds them in ``optax.lamb`` (so it can fail), and in
  ``init`` (the one-off per-tensor bound is a global reduction);
* per-device bytes of params plus state are total / 8, up to the replicated
  per-tensor scalars;
* the same holds for ``lns_madam`` on int8 codes over 5 steps with stochastic
  rounding, for ``nnx.Optimizer`` on variables annotated with
  ``nnx.with_partitioning``, and, by hypothesis, for tensors of any rank
  sharded along any one dimension.
"""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import collectives_in
from meshes import make_mesh
from meshes import partitioned_mlp
import numpy as np
import optax
import pytest
import transforms
from transforms import BY_NAME

import madam_optax

STEPS = 20

# name: (shape, spec); every spec splits the tensor over all 8 devices.
PARAM_LAYOUT = {
  "dense": ((64, 32), P("data", "fsdp")),
  "embed": ((96, 16), P(("data", "fsdp"), None)),
  "conv": ((3, 3, 8, 16), P(None, None, "data", "fsdp")),
  "scale": ((32,), P(("data", "fsdp"))),
}


def host_params():
  keys = jax.random.split(jax.random.key(0), len(PARAM_LAYOUT))
  return {
    name: np.asarray(jax.random.normal(key, shape, jnp.float32))
    for key, (name, (shape, _)) in zip(keys, sorted(PARAM_LAYOUT.items()))
  }


def param_shardings(mesh):
  return {
    name: NamedSharding(mesh, spec) for name, (_, spec) in PARAM_LAYOUT.items()
  }


def fake_grads(params, t):
  """An elementwise, step-dependent 'gradient': identical bits on any layout."""
  return jax.tree.map(
    lambda w: 0.1 * jnp.cos(w + 0.1 * t) * (1.0 + 0.5 * jnp.sin(t)), params
  )


def owning_param(path):
  """The parameter name a state leaf belongs to (its last dict key), if any."""
  last = path[-1] if path else None
  return last.key if isinstance(last, jax.tree_util.DictKey) else None


def owned_by_param(path, leaf, params):
  name = owning_param(path)
  return leaf.ndim > 0 and name in params and leaf.shape == params[name].shape


def assert_state_sharded_like_params(state, params):
  n_array_leaves = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keystr = jax.tree_util.keystr(path)
    if not owned_by_param(path, leaf, params):
      assert leaf.size <= 2, f"state leaf {keystr} belongs to no parameter"
      assert leaf.sharding.is_fully_replicated, keystr
      continue
    param = params[owning_param(path)]
    chex.assert_equal_shape([leaf, param])
    assert leaf.sharding.is_equivalent_to(param.sharding, param.ndim), (
      f"{keystr}: state sharding {leaf.sharding} != param sharding "
      f"{param.sharding}"
    )
    n_array_leaves += 1
  return n_array_leaves


def sharded_params(mesh):
  return jax.device_put(host_params(), param_shardings(mesh))


@functools.cache
def host_codes(fmt):
  """``host_params()`` encoded with ``fmt`` (under one jit: the eager encoding
  is many small ops)."""
  return jax.tree.map(
    np.asarray,
    jax.jit(
      lambda params: {
        name: madam_optax.lns_encode(w, fmt)[0] for name, w in params.items()
      }
    )(host_params()),
  )


# The contract runs on one tensor split over both axes (the others' layouts
# are in the tests below).
CONTRACT_TENSORS = ("dense",)


def case_params(case, mesh):
  """The case's params on the mesh (floats, or codes of its format), for the
  CONTRACT_TENSORS."""
  params = host_codes(case.code_format) if case.codes else host_params()
  shardings = param_shardings(mesh)
  return {
    name: jax.device_put(params[name], shardings[name])
    for name in CONTRACT_TENSORS
  }


def sharded_grads(params):
  """Float gradients with the params' shapes and shardings."""
  return fake_grads(jax.tree.map(lambda p: p.astype(jnp.float32), params), 1.0)


def update_step(tx):
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


# ---------------------------------------------------------------- shardings


def sharding_types(tree):
  return jax.tree.map(jax.typeof, tree)


@pytest.mark.parametrize(
  "case", transforms.cases(where=lambda case: not case.factored)
)
def test_state_follows_params_and_update_keeps_shardings(eight_devices, case):
  """Optax contrib's sharding checks, and no communication in the update.

  The eager ``init`` shards each per-parameter state leaf like its
  parameter; ``jax.jit(init)`` gives the same types; the compiled update
  (its shardings left to the types of its inputs) contains no collective and
  returns params and state of the types it was given.
  """
  mesh = make_mesh(eight_devices)
  with jax.set_mesh(mesh):
    params = case_params(case, mesh)
    tx = case.optimizer(params)
    state = tx.init(params)
    assert assert_state_sharded_like_params(state, params) > 0
    assert sharding_types(jax.jit(tx.init)(params)) == sharding_types(state)
    grads = sharded_grads(params)
    compiled = jax.jit(update_step(tx)).lower(params, grads, state).compile()
    assert collectives_in(compiled.as_text()) == []
    new_params, new_state = compiled(params, grads, state)
    assert sharding_types(new_state) == sharding_types(state)
    assert sharding_types(new_params) == sharding_types(params)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", ["madam", "madam_with_additive_fallback"])
def test_jit_init_keeps_param_shardings(eight_devices, name, axis_type):
  mesh = make_mesh(eight_devices, getattr(jax.sharding.AxisType, axis_type))
  params = sharded_params(mesh)
  tx = BY_NAME[name].optimizer(params)
  if axis_type == "Explicit":
    # Shardings are part of the types: even without out_shardings the state
    # follows the params. (With Auto axes XLA is free to replicate a buffer
    # of zeros, for optax.adam as for Madam: pin out_shardings, as below.)
    assert_state_sharded_like_params(jax.jit(tx.init)(params), params)
  # With out_shardings from the FSDP rule (what a training script pins).
  out_shardings = madam_optax.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=out_shardings)(params)
  assert_state_sharded_like_params(state, params)


# ------------------------------------------------- sharded == single device


def run_steps(step, params, state, steps=STEPS):
  for t in range(steps):
    params, state = step(params, state, jnp.float32(t))
  return params, state


def assert_close_to_scale(actual, desired, rtol):
  """|actual - desired| <= rtol * max|desired|, leaf by leaf."""
  for path, a, d in zip(
    *(
      [p for p, _ in jax.tree_util.tree_flatten_with_path(desired)[0]],
      jax.tree.leaves(actual),
      jax.tree.leaves(desired),
    )
  ):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    scale = np.max(np.abs(d)) if d.size else 0.0
    np.testing.assert_array_less(
      np.abs(a - d), rtol * scale + 1e-30, err_msg=jax.tree_util.keystr(path)
    )


# The parts of madam run inside it; bf16 state is covered by the other tests.
# log_quantise runs after madam (the registry's completion), on the int8
# grid (0.03 in log|w| between levels) with a rate that crosses levels. The
# layouts' w_max differ by an ulp, which moves a weight at a rounding boundary
# to the next level: on the registry's fine grid (0.001 apart) that happens
# to a few of the 2048 weights in 20 steps.
RUN_TRANSFORMS = [
  "madam",
  "log_quantise_nearest",
  "madam_with_additive_fallback",
]
RUN_OPTIONS = {
  "log_quantise_nearest": {"fmt": transforms.INT8_FORMAT, "learning_rate": 0.05}
}


@pytest.mark.parametrize("name", RUN_TRANSFORMS)
def test_sharded_run_matches_single_device_run(eight_devices, name):
  """20 steps on the (2, 4) mesh against 20 steps on one device.

  * From the same initial state the runs are bitwise equal (tolerance 0): the
    update is elementwise, whatever the layout.
  * Each initialised on its own layout, they agree to 1e-6 of each tensor's
    largest magnitude: ``init``'s per-tensor bound is a sum whose order
    depends on the layout (it differs by a few ulp), the only difference.
  """
  mesh = make_mesh(eight_devices)
  single = jax.device_put(host_params(), eight_devices[0])
  sharded = sharded_params(mesh)
  tx = BY_NAME[name].optimizer(single, **RUN_OPTIONS.get(name, {}))

  @jax.jit
  def step(params, state, t):
    return update_step(tx)(params, fake_grads(params, t), state)

  def layout(state):
    return jax.device_put(state, madam_optax.state_shardings(tx, sharded))

  single_state = tx.init(single)
  reference = run_steps(step, single, single_state)
  same_start = run_steps(step, sharded, layout(single_state))
  own_start = run_steps(step, sharded, layout(tx.init(sharded)))

  # The run is not trivial: every tensor moved.
  for key, p0 in host_params().items():
    assert not np.array_equal(np.asarray(own_start[0][key]), p0), key
  for params, state in (same_start, own_start):
    assert_state_sharded_like_params(state, params)
  reference = jax.device_get(reference)
  chex.assert_trees_all_equal(jax.device_get(same_start), reference)
  assert_close_to_scale(jax.device_get(own_start), reference, rtol=1e-6)


# --------------------------------------------------------- no communication


def compiled_update_text(tx, mesh, params):
  shardings = param_shardings(mesh)
  state = tx.init(params)
  state_sh = madam_optax.state_shardings(tx, params)
  state = jax.device_put(state, state_sh)
  grads = jax.device_put(fake_grads(params, 1.0), shardings)
  step = jax.jit(
    update_step(tx),
    in_shardings=(shardings, shardings, state_sh),
    out_shardings=(shardings, state_sh),
  )
  return step.lower(params, grads, state).compile().as_text()


def test_collective_check_finds_lamb_all_reduce(eight_devices):
  """LAMB's per-tensor trust ratio needs norms: an all-reduce every step."""
  mesh = make_mesh(eight_devices)
  params = sharded_params(mesh)
  text = compiled_update_text(optax.lamb(1e-3), mesh, params)
  assert "all-reduce" in collectives_in(text)


def test_init_bound_is_the_only_reduction(eight_devices):
  """The per-tensor bound (SPEC step 1) is a global reduction, once, at init."""
  mesh = make_mesh(eight_devices)
  params = sharded_params(mesh)
  tx = madam_optax.madam()
  out_sh = madam_optax.state_shardings(tx, params)
  init_text = (
    jax.jit(tx.init, out_shardings=out_sh).lower(params).compile().as_text()
  )
  assert "all-reduce" in collectives_in(init_text)


@hypothesis.settings(max_examples=4)
@hypothesis.given(
  shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
  split_dim=st.integers(0, 2),
  seed=st.integers(0, 2**16),
)
def test_any_tensor_split_any_way(eight_devices, shape, split_dim, seed):
  """A tensor split 8 ways along one of its dimensions: Madam's state
  follows it, every device holds 1/8 of it and of its state, and from the
  same state a step is bitwise the single-device step."""
  split_dim %= len(shape)
  shape[split_dim] *= 8
  spec = [None] * len(shape)
  spec[split_dim] = ("data", "fsdp")
  mesh = make_mesh(eight_devices)
  w = np.asarray(jax.random.normal(jax.random.key(seed), shape))
  params = {"w": jax.device_put(w, NamedSharding(mesh, P(*spec)))}
  tx = madam_optax.madam(learning_rate=0.1)
  state = tx.init(params)
  assert assert_state_sharded_like_params(state, params) == 1
  per_device = bytes_per_device((params, state))[0]
  assert set(per_device.values()) == {2 * w.nbytes // 8}
  # From the same state (the bound's sum is ordered differently per layout).
  single_state = tx.init({"w": w})
  state = jax.device_put(single_state, madam_optax.state_shardings(tx, params))
  step = jax.jit(update_step(tx))
  sharded = step(params, fake_grads(params, 1.0), state)
  single = step({"w": w}, fake_grads({"w": w}, 1.0), single_state)
  chex.assert_trees_all_equal(jax.device_get(sharded[0]), single[0])


# ----------------------------------------------------------------- memory


def bytes_per_device(trees):
  array_bytes, scalar_bytes = {}, {}
  for leaf in jax.tree.leaves(trees):
    target = scalar_bytes if leaf.ndim == 0 else array_bytes
    for shard in leaf.addressable_shards:
      target[shard.device] = target.get(shard.device, 0) + shard.data.nbytes
  return array_bytes, scalar_bytes


@pytest.mark.parametrize(
  "name", ["madam", "madam_bf16_state", "madam_with_additive_fallback"]
)
def test_per_device_bytes_are_one_eighth(eight_devices, name):
  mesh = make_mesh(eight_devices)
  params = sharded_params(mesh)
  state = BY_NAME[name].optimizer(params).init(params)
  leaves = jax.tree.leaves((params, state))
  total_arrays = sum(x.nbytes for x in leaves if x.ndim)
  total_scalars = sum(x.nbytes for x in leaves if not x.ndim)
  array_bytes, scalar_bytes = bytes_per_device((params, state))
  assert sorted(array_bytes, key=lambda d: d.id) == list(eight_devices)
  for device in eight_devices:
    # Tensors: exactly 1/8 each. Scalars (counts, per-tensor bounds): at most
    # one full copy per device.
    assert array_bytes[device] * 8 == total_arrays, device
    assert scalar_bytes.get(device, 0) <= total_scalars, device
    per_device = array_bytes[device] + scalar_bytes.get(device, 0)
    assert abs(per_device - (total_arrays + total_scalars) / 8) <= total_scalars


# --------------------------------------------------- Flax NNX, sharded vars


@pytest.mark.parametrize("recipe", ["madam", "with_additive_fallback"])
def test_nnx_optimizer_state_follows_sharded_variables(eight_devices, recipe):
  """``nnx.Optimizer`` on ``nnx.with_partitioning`` variables, then a step.

  The per-tensor bounds are a flat tuple of scalars in the state, so NNX's
  sharding metadata on the ``nnx.Param`` is not copied onto them."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  # Auto axes, as Flax NNX models usually run: XLA (GSPMD) chooses how to
  # shard the activations; the parameters are pinned by their annotations.
  mesh = make_mesh(eight_devices, jax.sharding.AxisType.Auto)

  with jax.set_mesh(mesh):
    model = partitioned_mlp(nnx.initializers.zeros_init())
    params = nnx.state(model, nnx.Param)
    tx = madam_optax.madam()
    if recipe == "with_additive_fallback":
      tx = madam_optax.with_additive_fallback(params, tx, optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def check():
      def flat(tree):
        return [
          (jax.tree_util.keystr(path), x)
          for path, x in jax.tree_util.tree_flatten_with_path(
            nnx.as_pure(tree)
          )[0]
        ]

      flat_params = flat(nnx.state(model, nnx.Param))
      # The annotations took effect: no parameter is replicated.
      for path, p in flat_params:
        assert not p.sharding.is_fully_replicated, (path, p.sharding)
      n = 0
      for path, value in flat(nnx.state(optimizer)):
        if value.ndim == 0:
          assert value.sharding.is_fully_replicated, path
          continue
        owner = next(p for k, p in flat_params if path.endswith(k))
        assert value.sharding.is_equivalent_to(owner.sharding, value.ndim), (
          path,
          value.sharding,
          owner.sharding,
        )
        n += 1
      # Madam's rms of both kernels, and either Madam's rms of the (zero)
      # bias or Adam's mu and nu of it.
      assert n == (3 if recipe == "madam" else 4)

    check()
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))

    @nnx.jit
    def train_step(model, optimizer, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    train_step(model, optimizer, x)
    check()


# ------------------------------------------------------ LNS codes (int8)


def test_lns_madam_on_sharded_codes(eight_devices):
  """``lns_madam`` on int8 codes sharded 8 ways: the second moment follows
  the codes, the update has no collective, and 5 steps with stochastic
  rounding are bitwise equal to the single-device steps."""
  mesh = make_mesh(eight_devices)
  case = BY_NAME["lns_madam_stochastic"]
  fmt = case.code_format
  assert fmt.dtype == np.int8
  # Two of the tensors (stochastic rounding is slow to compile), encoded
  # under one jit (the eager encoding is many small ops).
  encoded = jax.jit(
    lambda params: {
      name: madam_optax.lns_encode(params[name], fmt)
      for name in ("conv", "dense")
    }
  )(host_params())
  codes = {name: np.asarray(c) for name, (c, _) in encoded.items()}
  max_magnitudes = {name: m for name, (_, m) in encoded.items()}
  tx = case.optimizer(codes)
  single = jax.device_put(codes, eight_devices[0])
  shardings = {name: param_shardings(mesh)[name] for name in codes}
  sharded = jax.device_put(codes, shardings)
  # The eager init keeps the codes' shardings; so does a jitted one given
  # out_shardings.
  assert assert_state_sharded_like_params(tx.init(sharded), sharded) == len(
    codes
  )
  state_sh = madam_optax.state_shardings(tx, sharded)
  state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
  assert assert_state_sharded_like_params(state, sharded) == len(codes)

  def grads_of(codes, t):
    return fake_grads(
      madam_optax.lns_decode_tree(codes, max_magnitudes, fmt), t
    )

  def step(codes, state, t):
    return update_step(tx)(codes, grads_of(codes, t), state)

  sharded_step = jax.jit(
    step,
    in_shardings=(shardings, state_sh, None),
    out_shardings=(shardings, state_sh),
  )
  compiled = sharded_step.lower(sharded, state, jnp.float32(0)).compile()
  assert collectives_in(compiled.as_text()) == []

  reference = run_steps(jax.jit(step), single, tx.init(single), steps=5)
  result = run_steps(compiled, sharded, state, steps=5)
  assert result[0]["dense"].dtype == jnp.int8
  assert not np.array_equal(np.asarray(result[0]["dense"]), codes["dense"])
  assert_state_sharded_like_params(result[1], result[0])
  chex.assert_trees_all_equal(jax.device_get(result), jax.device_get(reference))


# ------------------------------------------------------------------ README


def test_readme_distributed_example_runs(eight_devices):
  """The code block of the README's distributed-training section."""
  import pathlib  # pylint: disable=import-outside-toplevel

  readme = (
    pathlib.Path(__file__).resolve().parents[1] / "README.md"
  ).read_text()
  section = readme.split("<!-- section:distributed -->", 1)[1]
  section = section.split("<!-- section:", 1)[0]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["params"]["w"].sharding == namespace["sharding"]
