"""The one byte counter: whole trees and bytes per device."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from madam_examples import memory


def test_tree_bytes_counts_every_dtype():
  tree = {
    "codes": jnp.zeros((4, 8), jnp.int8),
    "w": jnp.ones((3,), jnp.float32),
    "v": jnp.ones((5,), jnp.bfloat16),
    "host": np.zeros(2, np.float64),
    "key": jax.random.key(0),  # typed: its raw uint32 data
    "none": None,
  }
  key_bytes = jax.random.key_data(tree["key"]).nbytes
  assert memory.tree_bytes(tree) == 32 + 12 + 10 + 16 + key_bytes
  assert memory.tree_bytes({}) == 0
  abstract = jax.eval_shape(lambda: {"codes": tree["codes"], "w": tree["w"]})
  assert memory.tree_bytes(abstract) == 32 + 12  # before any compute


def test_bytes_per_device_split_and_replicated(eight_devices):
  mesh = jax.sharding.Mesh(np.array(eight_devices), ("x",))
  split = jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("x")))
  copied = jax.device_put(jnp.ones(3), NamedSharding(mesh, P()))
  counts = memory.bytes_per_device({"split": split, "copied": copied})
  assert sorted(counts, key=lambda d: d.id) == list(eight_devices)
  assert set(counts.values()) == {16 * 4 * 4 // 8 + 12}
  assert memory.tree_bytes({"split": split, "copied": copied}) == 256 + 12
