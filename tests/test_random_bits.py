"""Random bits for stochastic rounding: the counter-based hash and threefry.

``rng="hash"`` (the default of ``lns_level_step``, ``lns_madam`` and
``log_quantise``) derives each weight's uniform number from (seed, step,
tensor, element index). These tests hold it to what stochastic rounding
needs: unbiased rounding, no correlation across steps and tensors, no stream
that repeats another within a run, reproducibility, and the same bits
however the tensor is sharded. ``rng="threefry"`` stays available.
"""

import jax
import jax.numpy as jnp
from meshes import make_mesh
import numpy as np
import optax
import pytest

import madam_optax
from madam_optax._src import lns

FMT = madam_optax.LNSFormat(levels=127, base=1.05)


def _level_changes(
  fraction, *, steps, shape=(64, 64), leaves=2, rng="hash", seed=0
):
  """Level changes of ``lns_level_step`` for a constant step of ``fraction``
  levels, on codes in the middle of the range: shape (steps, leaves, *shape)."""
  lr = fraction * FMT.log_base  # fraction levels per unit update
  tx = madam_optax.lns_level_step(
    FMT, lr, rounding="stochastic", seed=seed, rng=rng
  )
  codes = {f"t{i}": jnp.full(shape, 60, jnp.int8) for i in range(leaves)}
  grads = jax.tree.map(lambda c: jnp.full(c.shape, -1.0), codes)  # toward w_max
  state = tx.init(codes)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    u, state = update(grads, state, codes)
    out.append(
      np.stack([np.asarray(u[f"t{i}"], np.int64) for i in range(leaves)])
    )
  return np.stack(out)


@pytest.mark.parametrize("fraction", [0.3, 0.05, 1.75, 0.999])
def test_hash_rounding_is_unbiased(fraction):
  """The mean level change is the fractional step, within 5 standard errors."""
  changes = _level_changes(fraction, steps=8)
  n = changes.size
  p = fraction - np.floor(fraction)
  standard_error = np.sqrt(p * (1 - p) / n)
  assert abs(changes.mean() - fraction) < 5 * standard_error
  assert set(np.unique(changes)) <= {np.floor(fraction), np.ceil(fraction)}


def test_hash_rounding_is_independent_across_steps_tensors_and_neighbours():
  """Correlations of the rounding residuals are within 5 standard errors of 0
  between consecutive steps, between tensors, and between neighbours."""
  fraction = 0.5
  residual = _level_changes(fraction, steps=10, leaves=3) - fraction

  def corr(a, b):
    a, b = a.ravel(), b.ravel()
    return float(np.mean(a * b) / (a.std() * b.std())), 5 / np.sqrt(a.size)

  pairs = {
    "step t, t+1": (residual[:-1], residual[1:]),
    "tensor i, i+1": (residual[:, :-1], residual[:, 1:]),
    "row neighbours": (residual[..., :-1, :], residual[..., 1:, :]),
    "column neighbours": (residual[..., :-1], residual[..., 1:]),
  }
  for name, (a, b) in pairs.items():
    c, bound = corr(a, b)
    assert abs(c) < bound, f"{name}: correlation {c:.4f}"


def _hash_streams(steps, tensors, n, seed=0):
  """The 24-bit numbers of each (step, tensor) stream: (steps, tensors, n)."""
  key = lns.initial_key(seed, "hash")
  x = jnp.zeros((n,), jnp.float32)
  uniform = jax.jit(lambda k: lns.uniform_from_hash(k, x))
  out = np.zeros((steps, tensors, n), np.int64)
  for t in range(steps):
    key, keys = lns.split_key(key, tensors, "hash")
    for i in range(tensors):
      out[t, i] = np.asarray(uniform(keys[i]), np.float64) * 2**24
  return out


def test_hash_streams_do_not_repeat_within_a_run():
  """No (step, tensor) stream equals or is a shifted copy of another: no run
  of four consecutive 24-bit numbers occurs twice in 40 steps x 6 tensors x
  4096 elements (a chance repeat has probability ~1e-18)."""
  streams = _hash_streams(40, 6, 4096).reshape(-1, 4096)
  assert len({row.tobytes() for row in streams}) == len(streams)
  n = streams.shape[1]
  windows = np.stack([streams[:, j : n - 3 + j] for j in range(4)], axis=-1)
  windows = np.ascontiguousarray(windows.reshape(-1, 4))
  assert len(np.unique(windows, axis=0)) == len(windows)
  # The numbers are uniform: each of the 24 bits is set half the time.
  bits = (streams[..., None] >> np.arange(24)) & 1
  np.testing.assert_allclose(
    bits.mean(axis=(0, 1)), 0.5, atol=5 * 0.5 / np.sqrt(streams.size)
  )


def test_hash_keys_differ_across_seeds_steps_and_tensors():
  keys = set()
  for seed in (0, 1, 2**31 + 5):
    key = lns.initial_key(seed, "hash")
    for _ in range(20):
      key, per_tensor = lns.split_key(key, 5, "hash")
      keys |= {tuple(np.asarray(k).tolist()) for k in per_tensor}
  assert len(keys) == 3 * 20 * 5


def test_hash_bits_are_reproducible_and_the_same_in_and_out_of_jit():
  first = _level_changes(0.4, steps=3, seed=7)
  again = _level_changes(0.4, steps=3, seed=7)
  other = _level_changes(0.4, steps=3, seed=8)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  key = jnp.asarray([12345, 6789], jnp.uint32)
  x = jnp.zeros((5, 7), jnp.float32)
  np.testing.assert_array_equal(
    lns.uniform_from_hash(key, x), jax.jit(lns.uniform_from_hash)(key, x)
  )


def test_sharded_run_is_bit_identical_to_one_device(eight_devices):
  """``lns_madam`` and ``log_quantise`` with hash rounding on tensors sharded
  over a 2 x 4 mesh: 4 steps equal the single-device steps bit for bit."""
  mesh = make_mesh(eight_devices)
  P = jax.sharding.PartitionSpec
  rng = np.random.default_rng(0)
  weights = {
    "kernel": rng.standard_normal((16, 24)),
    "conv": rng.standard_normal((3, 3, 8, 4)),
    "vector": rng.standard_normal(40),
  }
  specs = {
    "kernel": P("data", "fsdp"),
    "conv": P(None, None, "fsdp", "data"),
    "vector": P(("data", "fsdp")),
  }
  shardings = {k: jax.sharding.NamedSharding(mesh, s) for k, s in specs.items()}
  single = lambda tree: jax.device_put(tree, eight_devices[0])
  sharded = lambda tree: jax.device_put(tree, shardings)
  codes, _ = madam_optax.lns_encode_tree(
    jax.tree.map(jnp.asarray, weights), FMT, min_ndim=1
  )

  def run(tx, params, put):
    # Both runs start from the same state values, the sharded init's: the
    # per-tensor bound is a float sum whose order follows the sharding (XLA
    # adds each device's part, then the parts), so it may differ in its last
    # bit between the two layouts. What is compared is the steps, where the
    # rounding's random bits live.
    state = tx.init(sharded(params))
    if put is single:
      state = single(jax.device_get(state))
    params = put(params)
    step = jax.jit(
      lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)
      )
    )
    for t in range(4):
      grads = put(
        jax.tree.map(
          lambda w: jnp.asarray(
            np.sin(np.arange(w.size) * (t + 1.3)).reshape(w.shape), jnp.float32
          ),
          weights,
        )
      )
      params, state = step(params, state, grads)
    return jax.device_get((params, state)), params

  floats = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), weights)
  for tx, params in (
    (madam_optax.lns_madam(FMT, rounding="stochastic"), codes),
    (madam_optax.log_quantise(FMT, rounding="stochastic"), floats),
  ):
    reference, _ = run(tx, params, single)
    result, on_mesh = run(tx, params, sharded)
    for name, leaf in on_mesh.items():
      assert leaf.sharding.spec == specs[name]
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_threefry_option_still_works():
  """``rng="threefry"``: the state key is a jax.random key split every step,
  the rounding is unbiased, and it differs from the hash's."""
  fraction = 0.3
  changes = _level_changes(fraction, steps=4, rng="threefry")
  p = fraction
  assert abs(changes.mean() - fraction) < 5 * np.sqrt(
    p * (1 - p) / changes.size
  )
  assert not np.array_equal(changes, _level_changes(fraction, steps=4))
  tx = madam_optax.lns_madam(FMT, rng="threefry", seed=3)
  codes = {"w": jnp.full((8,), 60, jnp.int8)}
  state = tx.init(codes)
  np.testing.assert_array_equal(state[-1].key, jax.random.PRNGKey(3))
  _, state = tx.update({"w": jnp.ones(8)}, state, codes)
  np.testing.assert_array_equal(
    state[-1].key, jax.random.split(jax.random.PRNGKey(3), 2)[0]
  )
  quantise = madam_optax.log_quantise(
    FMT, rounding="stochastic", rng="threefry", max_magnitude=1.0
  )
  w = {"w": jnp.linspace(0.1, 0.9, 64)}
  u, _ = quantise.update(jax.tree.map(jnp.zeros_like, w), quantise.init(w), w)
  assert np.all(np.isfinite(np.asarray(u["w"])))


@pytest.mark.parametrize(
  "make",
  [
    lambda: madam_optax.lns_madam(FMT, rng="philox"),
    lambda: madam_optax.lns_level_step(
      FMT, rounding="stochastic", seed=0, rng="Hash"
    ),
    lambda: madam_optax.log_quantise(
      FMT,
      rounding="stochastic",
      seed=0,
      p_scale=3.0,
      max_magnitude=None,
      rng=None,
    ),
  ],
)
def test_unknown_random_bits_are_rejected(make):
  with pytest.raises(ValueError, match="rng must be one of"):
    make()


def test_hash_state_is_a_seed_word_and_a_step_counter():
  """The state keeps the key's shape and dtype (``uint32[2]``); the hash's
  second word counts steps, so a resumed run continues the same stream."""
  tx = madam_optax.lns_madam(FMT)
  codes = {"w": jnp.full((4, 4), 60, jnp.int8)}
  state = tx.init(codes)
  key = state[-1].key
  assert key.shape == (2,) and key.dtype == jnp.uint32
  grads = {"w": jnp.full((4, 4), 0.4)}
  for step in range(1, 4):
    _, state = tx.update(grads, state, codes)
    assert int(state[-1].key[1]) == step
    assert int(state[-1].key[0]) == int(key[0])
