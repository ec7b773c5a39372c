"""The example models: shapes, causality, and the sharded Transformer."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madam_examples import memory
from madam_examples import models


def _param_count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_mlp_shapes_and_features():
  model = models.MLP(64, (32, 16), 10, rngs=nnx.Rngs(0))
  x = jnp.ones((5, 8, 8, 1))
  chex.assert_shape(model(x), (5, 10))
  chex.assert_shape(model.features(x), (5, 16))
  assert _param_count(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3), (12, 10, 2)])
def test_cnn_head_fits_the_image_size(shape):
  model = models.CNN(shape, 7, (4, 6, 8), rngs=nnx.Rngs(0))
  chex.assert_shape(model(jnp.ones((3, *shape))), (3, 7))


def test_digits_cnn_is_the_small_one():
  model = nnx.eval_shape(lambda: models.CNN((8, 8, 1), 10, rngs=nnx.Rngs(0)))
  # conv 1->8, conv 8->16 (with biases), dense 4*4*16 -> 10.
  assert _param_count(model) == 72 + 8 + 1152 + 16 + 2560 + 10 == 3818
  names = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param)
    )[0]
  ]
  assert sum("bias" in n for n in names) == 3


def test_transformer_is_causal_and_has_no_qkv_bias():
  model = models.CharTransformer(20, 12, 16, 2, 2, rngs=nnx.Rngs(0))
  tokens = jnp.arange(24).reshape(2, 12) % 20
  logits = model(tokens)
  chex.assert_shape(logits, (2, 12, 20))
  changed = model(tokens.at[:, 7].set(3))
  np.testing.assert_allclose(changed[:, :7], logits[:, :7], atol=1e-6)
  assert not np.allclose(changed[:, 7:], logits[:, 7:])
  chex.assert_shape(model(tokens[:, :5]), (2, 5, 20))  # shorter than context
  assert not hasattr(model.blocks[0].qkv, "bias") or (
    model.blocks[0].qkv.bias is None
  )
  with pytest.raises(ValueError, match="multiple of the number of heads"):
    models.CharTransformer(20, 12, 18, 1, 4, rngs=nnx.Rngs(0))


def test_partitioned_transformer_builds_sharded_params(eight_devices):
  """Under a mesh, ``Partitioning.fsdp()`` creates every parameter split
  8 ways as its kind says; the model computes what the unsharded one does."""
  mesh = jax.make_mesh(
    (8,),
    ("fsdp",),
    devices=eight_devices,
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  with jax.set_mesh(mesh):
    model = models.CharTransformer(
      29,
      16,
      32,
      2,
      4,
      partitioning=models.Partitioning.fsdp("fsdp"),
      rngs=nnx.Rngs(0),
    )
  plain = models.CharTransformer(29, 16, 32, 2, 4, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  expected = {
    "kernel": ("fsdp", None),
    "embedding": (None, "fsdp"),
    "position": (None, "fsdp"),
    "bias": ("fsdp",),
    "scale": ("fsdp",),
  }
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = [k for k in expected if k in jax.tree_util.keystr(path)][0]
    spec = tuple(leaf.sharding.spec) + (None,) * (
      leaf.ndim - len(leaf.sharding.spec)
    )
    assert spec == expected[name], (jax.tree_util.keystr(path), spec)
    assert len(leaf.sharding.device_set) == 8
  total = memory.tree_bytes(params)
  per_device = memory.bytes_per_device(params)
  assert len(per_device) == 8
  assert all(n * 8 == total for n in per_device.values())
  for a, b in zip(
    jax.tree.leaves(params), jax.tree.leaves(nnx.state(plain, nnx.Param))
  ):
    np.testing.assert_array_equal(a, b)  # same values, split
  tokens = jnp.arange(32).reshape(2, 16) % 29
  np.testing.assert_allclose(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
