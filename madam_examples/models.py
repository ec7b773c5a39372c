"""Flax NNX models for three of the paper's families (arXiv:2006.14560, Figure 1).

Small on purpose (they train on a 2-core CPU in seconds), but each has the
structure that matters to a multiplicative optimizer: Flax's default
zero-initialised biases and normalisation offsets, which Madam cannot move and
which the examples hand to an additive optimizer with
``madam_optax.with_additive_fallback``.

* :class:`MLP`: a multilayer perceptron for flattened images.
* :class:`CNN`: a small convolutional classifier.
* :class:`CharTransformer`: a causal Transformer character language model,
  optionally created sharded over a device mesh (:class:`Partitioning`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp


class MLP(nnx.Module):
  """ReLU multilayer perceptron; flattens its input (N, ...) to (N, D)."""

  def __init__(
    self,
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    rngs: nnx.Rngs,
  ):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
    )
    self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The last hidden layer's activations."""
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(self.features(x))


class CNN(nnx.Module):
  """A small convolutional classifier: conv stages, then a dense head.

  Stage ``i`` is a 3x3 convolution (``widths[i]`` channels, zero-initialised
  bias) and a ReLU, with a 2x2 average pooling before every stage but the
  first; the last stage's activations are flattened into the head. On the
  8x8 digits with the default widths: conv 8, pool to 4x4, conv 16, dense
  256 -> 10 (3,818 parameters), small on purpose: it trains on a 2-core CPU
  in seconds, and the accuracy-versus-bits study trains it many times.

  Input (N, H, W, C) with ``image_shape == (H, W, C)``.
  """

  def __init__(
    self,
    image_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (8, 16),
    *,
    rngs: nnx.Rngs,
  ):
    height, width, channels = image_shape
    sizes = [channels, *widths]
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
    )
    pooled = 2 ** (len(widths) - 1)
    self.head = nnx.Linear(
      (height // pooled) * (width // pooled) * widths[-1],
      num_classes,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      if i > 0:
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
      x = jax.nn.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


class Partitioning(NamedTuple):
  """How a :class:`CharTransformer`'s parameters are split over a mesh.

  Each field is a ``PartitionSpec``-style tuple of mesh-axis names (or
  ``None``) given to ``nnx.with_partitioning``; building the model under
  ``jax.set_mesh(mesh)`` then creates every parameter already sharded.

  Attributes:
    kernel: every dense kernel, shape (in, out).
    vector: every bias and LayerNorm scale and offset, shape (dim,) or
      (4 dim,).
    embedding: the token and position tables, shape (rows, dim).
  """

  kernel: tuple[str | None, ...]
  vector: tuple[str | None, ...]
  embedding: tuple[str | None, ...]

  @classmethod
  def fsdp(cls, axis: str = "fsdp") -> Partitioning:
    """Fully sharded: every tensor split once over ``axis``.

    Kernels along their input dimension, vectors along their only one, the
    embedding tables along the model dimension; so a mesh axis of size ``n``
    needs ``dim % n == 0``, whatever the vocabulary size.
    """
    return cls((axis, None), (axis,), (None, axis))


def _initializer(init: Any, spec: tuple[str | None, ...] | None) -> Any:
  return init if spec is None else nnx.with_partitioning(init, spec)


class _Layers:
  """The Transformer's dense and LayerNorm layers under one partitioning."""

  def __init__(self, partitioning: Partitioning | None, rngs: nnx.Rngs):
    self.specs = partitioning or Partitioning(None, None, None)
    self.rngs = rngs

  def dense(self, din: int, dout: int, *, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
      din,
      dout,
      use_bias=bias,
      rngs=self.rngs,
      kernel_init=_initializer(
        nnx.initializers.lecun_normal(), self.specs.kernel
      ),
      bias_init=_initializer(nnx.initializers.zeros_init(), self.specs.vector),
    )

  def layer_norm(self, dim: int) -> nnx.LayerNorm:
    return nnx.LayerNorm(
      dim,
      rngs=self.rngs,
      scale_init=_initializer(nnx.initializers.ones_init(), self.specs.vector),
      bias_init=_initializer(nnx.initializers.zeros_init(), self.specs.vector),
    )


class TransformerBlock(nnx.Module):
  """Pre-norm causal self-attention and MLP, each with a residual."""

  def __init__(self, dim: int, num_heads: int, layers: _Layers):
    self.num_heads = num_heads
    self.norm1 = layers.layer_norm(dim)
    # No bias on q, k, v: the key bias's gradient is exactly zero in exact
    # arithmetic (softmax ignores a per-row constant), so any optimizer that
    # normalises its gradient (Adam, Madam) would only amplify round-off.
    self.qkv = layers.dense(dim, 3 * dim, bias=False)
    self.out = layers.dense(dim, dim)
    self.norm2 = layers.layer_norm(dim)
    self.up = layers.dense(dim, 4 * dim)
    self.down = layers.dense(4 * dim, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (
      y.reshape(b, t, self.num_heads, d // self.num_heads) for y in (q, k, v)
    )
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(attended.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):
  """A causal Transformer language model over characters.

  Input: token ids (N, T) with T <= ``context``; output: logits (N, T,
  ``vocab_size``) predicting the next character at every position. Token and
  position tables are drawn from N(0, 0.02^2), kernels LeCun-normal, biases
  and LayerNorm offsets zero (the additive optimizer's leaves under Madam).

  Args:
    vocab_size: number of token ids.
    context: the longest sequence (rows of the position table).
    dim: model width (a multiple of ``num_heads``).
    depth: number of blocks.
    num_heads: attention heads.
    partitioning: how to split the parameters over a mesh (e.g.
      ``Partitioning.fsdp()``); ``None`` for unsharded parameters.
    rngs: the parameters' random streams.
  """

  def __init__(
    self,
    vocab_size: int,
    context: int,
    dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    *,
    partitioning: Partitioning | None = None,
    rngs: nnx.Rngs,
  ):
    if dim % num_heads:
      raise ValueError(
        f"the model width {dim} is not a multiple of the "
        f"number of heads {num_heads}."
      )
    layers = _Layers(partitioning, rngs)
    table_init = _initializer(
      nnx.initializers.normal(0.02), layers.specs.embedding
    )
    self.embed = nnx.Embed(
      vocab_size, dim, embedding_init=table_init, rngs=rngs
    )
    self.position = nnx.Param(table_init(rngs.params(), (context, dim)))
    self.blocks = nnx.List(
      [TransformerBlock(dim, num_heads, layers) for _ in range(depth)]
    )
    self.norm = layers.layer_norm(dim)
    self.head = layers.dense(dim, vocab_size, bias=False)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
