"""Flax NNX models for the paper's four families (arXiv:2006.14560, Figure 1).

Small on purpose (they train on a 2-core CPU in seconds), but each has the
structure that matters to a multiplicative optimizer: Flax's default
zero-initialised biases and normalisation offsets, which Madam cannot move and
which the examples hand to an additive optimizer with
``madam_optax.with_additive_fallback``.

* :class:`MLP`: a multilayer perceptron for flattened images.
* :class:`ResNetCNN`: a small ResNet-style CNN with GroupNorm (no batch
  statistics, so its parameters are the whole state).
* :class:`CharTransformer`: a causal Transformer character language model.
* :class:`Generator` / :class:`Discriminator`: an MLP GAN for small images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """ReLU multilayer perceptron; flattens its input (N, ...) to (N, D)."""

  def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
               *, rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The last hidden layer's activations."""
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(self.features(x))


class ResidualBlock(nnx.Module):
  """conv-norm-relu-conv-norm plus the identity, then relu (He et al. 2016)."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm1 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return jax.nn.relu(x + y)


class ResNetCNN(nnx.Module):
  """A small ResNet: stem, residual stages (stride 2 between), mean-pool, dense.

  Works on any image size (global average pooling); input (N, H, W, C).
  """

  def __init__(self, in_channels: int, num_classes: int,
               widths: Sequence[int] = (16, 32), groups: int = 4,
               *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, widths[0], (3, 3), use_bias=False,
                         rngs=rngs)
    self.stem_norm = nnx.GroupNorm(widths[0], num_groups=groups, rngs=rngs)
    blocks, downs = [], []
    for i, w in enumerate(widths):
      if i > 0:
        downs.append(nnx.Conv(widths[i - 1], w, (3, 3), strides=(2, 2),
                              use_bias=False, rngs=rngs))
      blocks.append(ResidualBlock(w, groups, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.downs = nnx.List(downs)
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_norm(self.stem(x)))
    for i, block in enumerate(self.blocks):
      if i > 0:
        x = jax.nn.relu(self.downs[i - 1](x))
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


class TransformerBlock(nnx.Module):
  """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=num_heads, in_features=dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nnx.Module):
  """A causal Transformer language model over characters.

  Input: token ids (N, T) with T <= ``context``; output: logits (N, T, vocab)
  predicting the next character at every position.
  """

  def __init__(self, vocab_size: int, context: int, dim: int = 64,
               depth: int = 2, num_heads: int = 4, *, rngs: nnx.Rngs):
    self.token_embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.pos_embed = nnx.Embed(context, dim, rngs=rngs)
    self.blocks = nnx.List([TransformerBlock(dim, num_heads, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(t))
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


class Generator(nnx.Module):
  """Noise (N, latent) to images (N, H, W, C) in [-1, 1] through an MLP."""

  def __init__(self, latent: int, image_shape: Sequence[int],
               hidden: int = 128, *, rngs: nnx.Rngs):
    self.image_shape = tuple(image_shape)
    out = 1
    for s in self.image_shape:
      out *= s
    self.fc1 = nnx.Linear(latent, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, out, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = jax.nn.leaky_relu(self.fc1(z), 0.2)
    h = jax.nn.leaky_relu(self.fc2(h), 0.2)
    return jnp.tanh(self.out(h)).reshape(z.shape[0], *self.image_shape)


class Discriminator(nnx.Module):
  """Images (N, ...) to one real-vs-fake logit each, through an MLP."""

  def __init__(self, in_features: int, hidden: int = 128, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_features, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.leaky_relu(self.fc1(x.reshape(x.shape[0], -1)), 0.2)
    h = jax.nn.leaky_relu(self.fc2(h), 0.2)
    return self.out(h)[:, 0]
