"""Meshes and global batches (``madam_examples.mesh``) on the 8 simulated
CPU devices of ``conftest.py``."""

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from madam_examples import mesh


@pytest.mark.parametrize(
  "spec,sizes",
  [
    ("data=2,fsdp=4", {"data": 2, "fsdp": 4}),
    ("fsdp=8", {"data": 1, "fsdp": 8}),
    ("data=-1,fsdp=2", {"data": 4, "fsdp": 2}),
    (" data = 8 ", {"data": 8, "fsdp": 1}),
  ],
)
def test_parse_mesh(spec, sizes):
  assert mesh.parse_mesh(spec, 8) == sizes


@pytest.mark.parametrize(
  "spec,message",
  [
    ("data=2,fsdp=2", "JAX sees 8"),
    ("model=8", "AXIS=SIZE"),
    ("data=2,data=4", "AXIS=SIZE"),
    ("data=-1,fsdp=-1", "positive"),
    ("data=3,fsdp=-1", "multiple of 3"),
    ("data=0,fsdp=8", "positive"),
  ],
)
def test_parse_mesh_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    mesh.parse_mesh(spec, 8)


def test_local_rows_single_process(eight_devices):
  device_mesh = mesh.make_mesh("data=2,fsdp=4", eight_devices)
  sharding = NamedSharding(device_mesh, P(mesh.BATCH_AXES))
  assert mesh.local_rows(sharding, (16, 5)) == slice(0, 16)
  rows = np.arange(16 * 5).reshape(16, 5)
  batch = mesh.device_batch(rows, sharding)
  np.testing.assert_array_equal(np.asarray(batch), rows)
  assert batch.addressable_shards[1].data.shape == (2, 5)


def test_collectives_are_found_in_hlo_text():
  assert mesh.collectives_in_hlo(
    "%x = f32[8]{0} all-reduce(f32[8]{0} %y), replica_groups={}"
  ) == ["all-reduce"]
  assert mesh.collectives_in_hlo(
    "%s = all-gather-start(%p)\n%d = all-gather-done(%s)"
  ) == ["all-gather"]
  assert mesh.collectives_in_hlo("%m = f32[8]{0} multiply(%a, %b)") == []


def test_make_mesh_fills_the_free_axis(eight_devices):
  device_mesh = mesh.make_mesh("data=-1,fsdp=2", eight_devices)
  assert dict(device_mesh.shape) == {"data": 4, "fsdp": 2}
  assert list(device_mesh.devices.flat) == list(eight_devices)
