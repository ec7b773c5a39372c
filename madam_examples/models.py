"""Flax NNX models for three of the paper's families (arXiv:2006.14560, Figure 1).

Small on purpose (they train on a 2-core CPU in seconds), but with what
matters to a multiplicative optimizer: Flax's zero-initialised biases and
normalisation offsets, which Madam cannot move (the examples hand them to
Adam). :class:`MLP` and :class:`CNN` classify images; :class:`CharTransformer`
is a causal character language model, optionally created sharded over a
device mesh (:class:`Partitioning`).
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

  Stage ``i`` is a 3x3 convolution (``widths[i]`` channels) and a ReLU, with
  a 2x2 average pooling before every stage but the first. On the 8x8 digits:
  conv 8, pool to 4x4, conv 16, dense 256 -> 10 (3,818 parameters). Input
  (N, H, W, C) with ``image_shape == (H, W, C)``.
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

  ``PartitionSpec``-style tuples of mesh-axis names (or ``None``) for every
  dense ``kernel`` (in, out), every bias and LayerNorm ``vector``, and the
  ``embedding`` tables (rows, dim), given to ``nnx.with_partitioning``: a
  model built under ``jax.set_mesh(mesh)`` is created already sharded.
  """

  kernel: tuple[str | None, ...]
  vector: tuple[str | None, ...]
  embedding: tuple[str | None, ...]

  @classmethod
  def fsdp(cls, axis: str = "fsdp") -> Partitioning:
    """Fully sharded: every tensor split once over ``axis``, the embedding
    tables along the model dimension (an axis of size ``n`` needs
    ``dim % n == 0``, whatever the vocabulary size)."""
    return cls((axis, None), (axis,), (None, axis))


def _init(init: Any, spec: tuple[str | None, ...] | None) -> Any:
  return init if spec is None else nnx.with_partitioning(init, spec)


def _dense(din, dout, specs, rngs, bias=True) -> nnx.Linear:
  kernel = _init(nnx.initializers.lecun_normal(), specs.kernel)
  zeros = _init(nnx.initializers.zeros_init(), specs.vector)
  return nnx.Linear(
    din, dout, use_bias=bias, kernel_init=kernel, bias_init=zeros, rngs=rngs
  )


def _layer_norm(dim, specs, rngs) -> nnx.LayerNorm:
  ones = _init(nnx.initializers.ones_init(), specs.vector)
  zeros = _init(nnx.initializers.zeros_init(), specs.vector)
  return nnx.LayerNorm(dim, scale_init=ones, bias_init=zeros, rngs=rngs)


class TransformerBlock(nnx.Module):
  """Pre-norm causal self-attention and MLP, each with a residual."""

  def __init__(self, dim: int, num_heads: int, specs: Partitioning, rngs):
    self.num_heads = num_heads
    self.norm1 = _layer_norm(dim, specs, rngs)
    # No bias on q, k, v: the key bias's gradient is exactly zero in exact
    # arithmetic (softmax ignores a per-row constant), so any optimizer that
    # normalises its gradient (Adam, Madam) would only amplify round-off.
    self.qkv = _dense(dim, 3 * dim, specs, rngs, bias=False)
    self.out = _dense(dim, dim, specs, rngs)
    self.norm2 = _layer_norm(dim, specs, rngs)
    self.up = _dense(dim, 4 * dim, specs, rngs)
    self.down = _dense(4 * dim, dim, specs, rngs)

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
    vocab_size, context: the number of token ids; the longest sequence.
    dim, depth, num_heads: the width (a multiple of ``num_heads``), the
      number of blocks and of attention heads.
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
    specs = partitioning or Partitioning(None, None, None)
    table_init = _init(nnx.initializers.normal(0.02), specs.embedding)
    self.embed = nnx.Embed(
      vocab_size, dim, embedding_init=table_init, rngs=rngs
    )
    self.position = nnx.Param(table_init(rngs.params(), (context, dim)))
    self.blocks = nnx.List(
      [TransformerBlock(dim, num_heads, specs, rngs) for _ in range(depth)]
    )
    self.norm = _layer_norm(dim, specs, rngs)
    self.head = _dense(dim, vocab_size, specs, rngs, bias=False)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
