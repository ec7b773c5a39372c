"""The sharded training example (``madam_examples.sharded_train``) on the 8
simulated CPU devices of ``conftest.py``: a (data=2, fsdp=4) mesh against one
device."""

import dataclasses

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from madam_examples import sharded_train

TINY = sharded_train.Config(mesh="data=2,fsdp=4", steps=6, batch_size=16,
                            context=32, dim=32, heads=2, layers=1)
RTOL = 1e-5   # of each tensor's largest magnitude; of each loss


@pytest.fixture(scope="module")
def sharded_run(eight_devices):
  return sharded_train.train(TINY, eight_devices)


@pytest.fixture(scope="module")
def single_run(eight_devices):
  return sharded_train.train(dataclasses.replace(TINY, mesh="data=1"),
                             eight_devices[:1])


@pytest.mark.parametrize("spec,sizes", [
    ("data=2,fsdp=4", {"data": 2, "fsdp": 4}),
    ("fsdp=8", {"data": 1, "fsdp": 8}),
    ("data=-1,fsdp=2", {"data": 4, "fsdp": 2}),
    (" data = 8 ", {"data": 8, "fsdp": 1}),
])
def test_parse_mesh(spec, sizes):
  assert sharded_train.parse_mesh(spec, 8) == sizes


@pytest.mark.parametrize("spec,message", [
    ("data=2,fsdp=2", "JAX sees 8"),
    ("model=8", "AXIS=SIZE"),
    ("data=2,data=4", "AXIS=SIZE"),
    ("data=-1,fsdp=-1", "positive"),
    ("data=3,fsdp=-1", "multiple of 3"),
    ("data=0,fsdp=8", "positive"),
])
def test_parse_mesh_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    sharded_train.parse_mesh(spec, 8)


def test_mesh_that_does_not_divide_the_model_is_refused(eight_devices):
  config = dataclasses.replace(TINY, mesh="fsdp=8", dim=36, heads=2)
  with pytest.raises(ValueError, match="--dim 36"):
    sharded_train.setup(config, eight_devices)


def test_sharded_run_matches_single_device_run(sharded_run, single_run):
  """Same losses and weights to 1e-5 relative: only the order of the
  gradient sums differs between the layouts."""
  losses, reference = (np.asarray(r["losses"]) for r in (sharded_run,
                                                         single_run))
  assert losses[-1] < losses[0]          # it trains
  np.testing.assert_allclose(losses, reference, rtol=RTOL)
  params = jax.device_get(sharded_train.params_of(sharded_run["run"],
                                                  sharded_run["state"]))
  expected = jax.device_get(sharded_train.params_of(single_run["run"],
                                                    single_run["state"]))
  for (path, p), q in zip(
      jax.tree_util.tree_flatten_with_path(nnx.as_pure(params))[0],
      jax.tree.leaves(nnx.as_pure(expected))):
    np.testing.assert_array_less(np.abs(p - q),
                                 RTOL * np.max(np.abs(q)) + 1e-30,
                                 err_msg=jax.tree_util.keystr(path))


def _flat(tree):
  return [(jax.tree_util.keystr(path), x) for path, x in
          jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0]]


def test_optimizer_state_is_sharded_like_the_params(sharded_run):
  run, opt_state = sharded_run["run"], sharded_run["state"][1]
  params = _flat(sharded_train.params_of(run, sharded_run["state"]))
  n_sharded = 0
  for path, leaf in _flat(opt_state):
    if leaf.ndim == 0:       # counts, per-tensor bounds
      assert leaf.sharding.is_fully_replicated, path
      continue
    # The state leaf of parameter ['blocks'][0]['up']['kernel'] ends in it.
    owner = [p for name, p in params if path.endswith(name)]
    assert len(owner) == 1, path
    assert leaf.shape == owner[0].shape, path
    assert leaf.sharding.is_equivalent_to(owner[0].sharding, leaf.ndim), path
    n_sharded += 1
  # Madam's second moment for every non-zero tensor; Adam's two for the rest.
  n_zero = sum(1 for _, p in params if not np.any(np.asarray(p)))
  assert n_zero == 0    # biases have moved (Adam), none stayed zero
  assert n_sharded > len(params)
  # Every parameter is split 4 ways (fsdp) and replicated over data.
  for path, p in params:
    assert "fsdp" in jax.tree.leaves(tuple(p.sharding.spec)), path
    chex.assert_equal(p.addressable_shards[0].data.size * 4, p.size)


def test_per_device_bytes_are_a_quarter(sharded_run):
  """fsdp=4: every device holds 1/4 of params and optimizer state, up to
  the replicated scalars (step counts, per-tensor bounds)."""
  state = sharded_run["state"]
  leaves = jax.tree.leaves(state)
  scalars = sum(x.nbytes for x in leaves if x.ndim == 0)
  arrays = sum(x.nbytes for x in leaves if x.ndim)
  per_device = sharded_train.bytes_per_device(state)
  assert len(per_device) == 8
  for device, nbytes in per_device.items():
    assert nbytes - scalars == arrays / 4, device


def test_optimizer_update_has_no_collectives(sharded_run):
  run, state = sharded_run["run"], sharded_run["state"]
  hlo = sharded_train.optimizer_update(run).lower(
      state, sharded_train.params_of(run, state)).compile().as_text()
  assert sharded_train.collectives_in_hlo(hlo) == []
  assert sharded_train.collectives_in_hlo(
      "%x = f32[8]{0} all-reduce(f32[8]{0} %y), replica_groups={}") == [
          "all-reduce"]


@pytest.mark.slow
def test_main_runs_the_documented_command(eight_devices, capsys):
  """The command line, as in the module docstring (devices already set)."""
  argv = ["--mesh", "data=2,fsdp=-1", "--steps", "2", "--log-every", "1",
          "--dim", "32", "--heads", "2", "--layers", "1", "--context", "16",
          "--batch-size", "8", "--check-collectives"]
  assert sharded_train.main(argv) == 0
  out = capsys.readouterr().out
  assert "step     2" in out
  assert "collectives in the optimizer update: none" in out


def test_local_rows_single_process(eight_devices):
  mesh = sharded_train.make_mesh("data=2,fsdp=4", eight_devices)
  sharding = sharded_train.NamedSharding(mesh, sharded_train.P(
      sharded_train.BATCH_AXES))
  assert sharded_train.local_rows(sharding, (16, 5)) == slice(0, 16)
  rows = np.arange(16 * 5).reshape(16, 5)
  batch = sharded_train.device_batch(rows, sharding)
  np.testing.assert_array_equal(np.asarray(batch), rows)
  assert batch.addressable_shards[1].data.shape == (2, 5)
