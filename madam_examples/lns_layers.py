"""Training a decoder on int8 LNS codes, one layer's float weights at a time.

A language model ``token table -> blocks x L -> output matrix`` keeps its
weights as int8 codes and is trained by ``lns_madam`` in a step that never
holds the model, or its gradient, in float. The parameters come in four parts:
``"layers"`` (the ``L`` blocks stacked on a leading axis, run by
``jax.lax.scan``); ``"tokens"`` ``(k, c, d)`` and ``"output"`` ``(k, d, c)``
(the token table and output matrix, their vocabulary split into ``k``
tensors of ``c`` entries, each with its own scale and statistics); and
``"other"`` (positions, final LayerNorm, ...).

Forwards, the step decodes the token rows it looks up, each block (keeping
only its input) and each output chunk (keeping only the logits). Backwards it
decodes each chunk and block again, takes its gradient with ``jax.vjp`` and,
with ``release=True``, applies that tensor's update to its codes and
optimizer state at once, in place: at any time one block's or chunk's
weights and gradient exist in float. ``release=False`` stacks the gradients
and updates afterwards. Both give the codes of the plain step (the whole
loss's ``madam_optax.lns_value_and_grad``, then every update; tested).

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import madam_optax

PARTS = ("tokens", "layers", "output", "other")
STACKED = ("tokens", "layers", "output")


class Decoder(NamedTuple):
  """The model's own functions (the step handles the vocabulary matrices).

  Attributes:
    embed: ``(other, token_vectors, batch) -> h``.
    block: ``(layer, h) -> h``: one block.
    final: ``(other, h) -> features``, multiplied by the output matrix.
    loss: ``(logits, batch) -> loss``, a float32 scalar.
    token_ids: ``batch -> ids`` looked up in the token table.
  """

  embed: Callable[[Any, jax.Array, Any], jax.Array]
  block: Callable[[Any, jax.Array], jax.Array]
  final: Callable[[Any, jax.Array], jax.Array]
  loss: Callable[[jax.Array, Any], jax.Array]
  token_ids: Callable[[Any], jax.Array]


def init(txs: dict[str, optax.GradientTransformation], codes: dict) -> dict:
  """The optimizer states; a stacked part's is ``vmap``-ped over its tensors."""
  return {
    p: (jax.vmap(txs[p].init) if p in STACKED else txs[p].init)(codes[p])
    for p in PARTS
  }


def _at(tree: Any, i: Any) -> Any:
  return jax.tree.map(lambda x: x[i], tree)


def _put(tree: Any, part: Any, i: Any) -> Any:
  return jax.tree.map(
    lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0), tree, part
  )


def _update(tx, grads, state, codes):
  updates, state = tx.update(grads, state, codes)
  return optax.apply_updates(codes, updates), state


def _logits(features, w):
  """``features @ w`` in ``w``'s dtype, then float32."""
  return jnp.matmul(features.astype(w.dtype), w).astype(jnp.float32)


def _token_grad(ids, d_rows, j, c):
  """The gradient of token chunk ``j`` (``(c, d)``) from the rows' gradient."""
  one_hot = jax.nn.one_hot(ids - j * c, c, dtype=d_rows.dtype)
  return jnp.einsum("...c,...d->cd", one_hot, d_rows)


def train_step(
  model: Decoder,
  txs: dict[str, optax.GradientTransformation],
  fmt: madam_optax.LNSFormat,
  *,
  compute_dtype: Any = jnp.bfloat16,
  release: bool = True,
) -> Callable[..., tuple[dict, dict, jax.Array]]:
  """``step(codes, opt_state, max_magnitudes, batch) -> (codes, opt_state, loss)``.

  ``codes``, ``opt_state`` and ``max_magnitudes`` are dicts of the
  :data:`PARTS`; jit the step with ``donate_argnums=(0, 1)``. Weights decode
  to ``compute_dtype`` and their gradients are in it.
  """

  def decode(codes, max_magnitudes):
    return madam_optax.lns_decode_tree(
      codes, max_magnitudes, fmt, compute_dtype
    )

  def _zero_grad(x):
    coded = jnp.issubdtype(x.dtype, jnp.integer)
    return jnp.zeros(
      x.shape, (compute_dtype or jnp.float32) if coded else x.dtype
    )

  def step(codes, opt_state, scales, batch):
    new_codes, new_state = dict(codes), dict(opt_state)
    ids = model.token_ids(batch)
    k, c = codes["tokens"].shape[:2]
    rows = decode(  # only the rows looked up, each with its chunk's scale
      codes["tokens"].reshape(k * c, -1)[ids],
      scales["tokens"].reshape(k)[ids // c][..., None],
    )
    other = decode(codes["other"], scales["other"])
    h, embed_vjp = jax.vjp(lambda o, r: model.embed(o, r, batch), other, rows)

    def block_forward(h, layer):
      return model.block(decode(*layer), h), h  # keep the block's input

    h, inputs = jax.lax.scan(
      block_forward, h, (codes["layers"], scales["layers"])
    )
    features, final_vjp = jax.vjp(model.final, other, h)

    def chunk_logits(_, chunk):
      return None, _logits(features, decode(*chunk))

    _, logits = jax.lax.scan(
      chunk_logits, None, (codes["output"], scales["output"])
    )  # (k, ..., c)
    logits = jnp.moveaxis(logits, 0, -2)
    loss, loss_vjp = jax.vjp(
      lambda z: model.loss(z, batch), logits.reshape(*logits.shape[:-2], -1)
    )
    (d_logits,) = loss_vjp(jnp.ones_like(loss))
    d_logits = jnp.moveaxis(d_logits.reshape(logits.shape), -2, 0)

    def backward(tx, grad_of, carry, i, part):
      """Chunk ``i`` of a stacked part: its gradient, then (release) its update."""
      part_codes, part_state, grads, extra = carry
      ci = _at(part_codes, i)
      g, extra = grad_of(ci, _at(scales[part], i), i, extra)
      if release:
        ci, si = _update(tx, g, _at(part_state, i), ci)
        part_codes, part_state = (
          _put(part_codes, ci, i),
          _put(part_state, si, i),
        )
      else:
        grads = _put(grads, g, i)
      return (part_codes, part_state, grads, extra), None

    def run(part, grad_of, extra, reverse=False):
      zeros = None if release else jax.tree.map(_zero_grad, codes[part])
      n = jax.tree.leaves(codes[part])[0].shape[0]
      (c_, s_, grads, extra), _ = jax.lax.scan(
        lambda carry, i: backward(txs[part], grad_of, carry, i, part),
        (codes[part], opt_state[part], zeros, extra),
        jnp.arange(n),
        reverse=reverse,
      )
      if not release:
        c_, s_ = jax.vmap(lambda g, s, c: _update(txs[part], g, s, c))(
          grads, opt_state[part], codes[part]
        )
      new_codes[part], new_state[part] = c_, s_
      return extra

    def output_grad(ci, si, i, d_features):
      _, vjp = jax.vjp(lambda w, f: _logits(f, w), decode(ci, si), features)
      g, df = vjp(d_logits[i])
      return g, d_features + df

    d_features = run("output", output_grad, jnp.zeros_like(features))
    d_other_final, dh = final_vjp(d_features)

    def block_grad(ci, si, i, dh):
      _, vjp = jax.vjp(model.block, decode(ci, si), _at(inputs, i))
      return vjp(dh)

    dh = run("layers", block_grad, dh, reverse=True)
    d_other_embed, d_rows = embed_vjp(dh)
    run("tokens", lambda ci, si, i, e: (_token_grad(ids, d_rows, i, c), e), 0)
    d_other = jax.tree.map(jnp.add, d_other_final, d_other_embed)
    new_codes["other"], new_state["other"] = _update(
      txs["other"], d_other, opt_state["other"], codes["other"]
    )
    return new_codes, new_state, loss

  return step


def loss_of_weights(model: Decoder) -> Callable[[dict, Any], jax.Array]:
  """The whole model's loss at float weights (the plain forward pass)."""

  def loss(weights, batch):
    table = weights["tokens"]
    rows = table.reshape(-1, table.shape[-1])[model.token_ids(batch)]
    h = model.embed(weights["other"], rows, batch)
    h, _ = jax.lax.scan(
      lambda h, w: (model.block(w, h), None), h, weights["layers"]
    )
    f = model.final(weights["other"], h)
    logits = jax.vmap(lambda w: _logits(f, w))(weights["output"])
    logits = jnp.moveaxis(logits, 0, -2)
    return model.loss(logits.reshape(*logits.shape[:-2], -1), batch)

  return loss
