"""The sharded training example (``madam_examples.sharded_train``) on the 8
simulated CPU devices of ``conftest.py``: a (data=2, fsdp=4) mesh against one
device."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from examples import nan_injection
from madam_examples import checkpointing
from madam_examples import data
from madam_examples import memory
from madam_examples import mesh
from madam_examples import sharded_train

TINY = sharded_train.Config(
  mesh="data=2,fsdp=4",
  steps=6,
  batch_size=16,
  context=32,
  dim=32,
  heads=2,
  layers=1,
)
RTOL = 1e-5  # of each tensor's largest magnitude; of each loss


@pytest.fixture(scope="module")
def sharded_run(eight_devices):
  return sharded_train.train(TINY, eight_devices)


@pytest.fixture(scope="module")
def single_run(eight_devices):
  return sharded_train.train(
    dataclasses.replace(TINY, mesh="data=1"), eight_devices[:1]
  )


def test_mesh_that_does_not_divide_the_model_is_refused(eight_devices):
  config = dataclasses.replace(TINY, mesh="fsdp=8", dim=36, heads=2)
  with pytest.raises(ValueError, match="--dim 36"):
    sharded_train.setup(config, eight_devices)
  config = dataclasses.replace(TINY, mesh="fsdp=8", dim=32, heads=3)
  with pytest.raises(ValueError, match="--heads 3"):
    sharded_train.setup(config, eight_devices)


def test_sharded_run_matches_single_device_run(sharded_run, single_run):
  """Same losses and weights to 1e-5 relative: only the order of the
  gradient sums differs between the layouts."""
  losses, reference = (
    np.asarray(r["losses"]) for r in (sharded_run, single_run)
  )
  assert losses[-1] < losses[0]  # it trains
  np.testing.assert_allclose(losses, reference, rtol=RTOL)
  params = jax.device_get(sharded_run["state"].params)
  expected = jax.device_get(single_run["state"].params)
  for (path, p), q in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected)
  ):
    np.testing.assert_array_less(
      np.abs(p - q),
      RTOL * np.max(np.abs(q)) + 1e-30,
      err_msg=jax.tree_util.keystr(path),
    )


def _flat(tree):
  return [
    (jax.tree_util.keystr(path), x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def test_optimizer_state_is_sharded_like_the_params(sharded_run):
  state = sharded_run["state"]
  opt_state = state.opt_state["model"]
  params = _flat(state.params["model"])
  # The examples' Transformer over the shared character vocabulary.
  assert dict(params)["['embed']['embedding']"].shape == (
    len(data.VOCAB),
    TINY.dim,
  )
  n_sharded = 0
  for path, leaf in _flat(opt_state):
    if leaf.ndim == 0:  # counts, per-tensor bounds
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
  assert n_zero == 0  # biases have moved (Adam), none stayed zero
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
  per_device = memory.bytes_per_device(state)
  assert len(per_device) == 8
  for device, nbytes in per_device.items():
    assert nbytes - scalars == arrays / 4, device


def test_optimizer_update_has_no_collectives(sharded_run):
  run, state = sharded_run["run"], sharded_run["state"]
  hlo = (
    sharded_train.optimizer_update(run)
    .lower(state, state.params)
    .compile()
    .as_text()
  )
  assert mesh.collectives_in_hlo(hlo) == []


@pytest.mark.slow
def test_main_runs_the_documented_command(eight_devices, capsys):
  """The command line, as in the module docstring (devices already set)."""
  argv = [
    "--mesh",
    "data=2,fsdp=-1",
    "--steps",
    "2",
    "--log-every",
    "1",
    "--dim",
    "32",
    "--heads",
    "2",
    "--layers",
    "1",
    "--context",
    "16",
    "--batch-size",
    "8",
    "--check-collectives",
  ]
  assert sharded_train.main(argv) == 0
  out = capsys.readouterr().out
  assert "step     2" in out
  assert "collectives in the optimizer update: none" in out
  # Memory: every device, and it says so.
  assert "memory on all 8 devices:" in out
  assert (
    sum(
      line.startswith("  TFRT_CPU_") or line.startswith("  cpu:")
      for line in out.splitlines()
    )
    == 8
  )


def test_bad_steps_stop_the_run_and_a_resume_reshards_onto_another_mesh(
  tmp_path, eight_devices, sharded_run
):
  """NaN at steps 3 and 4 with --max-bad-steps 2: the run stops at step 4
  with one line, keeping the step-2 checkpoint (no checkpoint is written
  after a skipped step). Resumed without the NaNs on another mesh (every
  tensor split 8 ways instead of 4), the run reads the checkpoint into the
  new layout and ends where the uninterrupted (data 2, fsdp 4) run does."""
  ckpt = str(tmp_path / "ckpt")
  options = sharded_train.RunOptions(
    checkpoint_dir=ckpt, checkpoint_every=2, max_bad_steps=2
  )
  with (
    nan_injection.nan_at({3, 4}),
    pytest.raises(
      sharded_train.BadStepsError,
      match=(
        r"^stopped at step 4: 2 consecutive steps \(3 to 4\) had a non-finite "
        r"loss or gradient \(--max-bad-steps 2\); the last checkpoint, step 2 "
        rf"in {ckpt}, is kept\. Lower --learning-rate or check the data, then "
        r"rerun\.$"
      ),
    ),
  ):
    sharded_train.train(TINY, eight_devices, options=options)
  assert checkpointing.all_steps(ckpt) == [2]
  resumed = sharded_train.train(
    dataclasses.replace(TINY, mesh="fsdp=8"),
    eight_devices,
    options=sharded_train.RunOptions(checkpoint_dir=ckpt, checkpoint_every=2),
  )
  assert resumed["resumed_from"] == 2 and resumed["skipped_steps"] == 0
  kernel = resumed["state"].params["model"]["head"]["kernel"]
  assert kernel.addressable_shards[0].data.shape[0] * 8 == kernel.shape[0]
  np.testing.assert_allclose(
    resumed["losses"], sharded_run["losses"][2:], rtol=RTOL
  )
  params = jax.device_get(resumed["state"].params)
  expected = jax.device_get(sharded_run["state"].params)
  for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_less(np.abs(p - q), RTOL * np.max(np.abs(q)))
  assert checkpointing.all_steps(ckpt) == [2, 4, 6]
