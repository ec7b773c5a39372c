"""The jittable training step every example shares, on float or LNS weights.

Training is functional: a model is split once (``nnx.split``) into a static
``graphdef`` and a pytree of parameters, which the losses ``nnx.merge`` back,
and the :class:`TrainState` is a plain pytree. So the same step runs one
model, a batch of seeds and rates under ``jax.vmap``, a state sharded over a
mesh, or under a checkpointer. A state has one or more *components*
(``"model"``; the GAN's ``"generator"`` and ``"discriminator"``), each with
its own loss and optimizer.

LNS training is the same step on integer codes: the leaves Madam can move are
encoded into LNS codes (:func:`encode_lns`), the losses see the decoded
weights (:func:`weights`), and the gradients are
``madam_optax.lns_value_and_grad``'s, so LNS-Madam updates the codes.

Reference: Bernstein et al., arXiv:2006.14560.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

import madam_optax

Params = dict[str, Any]  # component name -> parameters (a pure nnx.State)
Loss = Callable[[Params, Any, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything a run carries from step to step; a plain pytree.

  Attributes:
    params: component name -> trained leaves (float weights, or LNS codes
      where encoded).
    opt_state: component name -> optimizer state.
    key: the PRNG key of batch sampling (split at every step).
    step: steps done.
    max_magnitudes: for LNS codes, component name -> per-tensor scales
      (``None`` for leaves kept in float); ``None`` for float training.
  """

  params: Params
  opt_state: dict[str, Any]
  key: jax.Array
  step: jax.Array
  max_magnitudes: Params | None = None


def encode_lns(
  params: Any,
  reference: Any,
  fmt: madam_optax.LNSFormat,
  *,
  p_scale: float = 3.0,
  labels: Callable[[Any], Any] = madam_optax.multiplicative_labels,
) -> tuple[Any, Any]:
  """LNS codes of the leaves Madam can move; the others stay float.

  Like ``madam_optax.lns_encode_tree``, but the leaves are chosen from
  concrete ``reference`` parameters, so ``params`` may be traced (a ``vmap``
  over seeds).

  Args:
    params, reference: float parameters (may be traced), and concrete ones
      of the same structure (any seed), from which ``labels`` are taken.
    fmt, p_scale: the codes' format, and each tensor's scale as a multiple
      of its RMS (SPEC step 1).
    labels: ``reference -> labels`` (``"multiplicative"`` leaves are
      encoded); ``madam_optax.madam_labels`` for the Transformer recipe.

  Returns:
    ``(codes, max_magnitudes)``: integer codes where encoded, and each
    tensor's scale ``p_scale * RMS(w0)`` there (``None`` elsewhere).
  """

  def leaf(p, label):
    if label != "multiplicative":
      return p, None
    return madam_optax.lns_encode(p, fmt, p_scale=p_scale)

  pairs = jax.tree.map(leaf, params, labels(reference))
  is_pair = lambda x: isinstance(x, tuple)
  return (
    jax.tree.map(lambda x: x[0], pairs, is_leaf=is_pair),
    jax.tree.map(lambda x: x[1], pairs, is_leaf=is_pair),
  )


def weights(
  state: TrainState, lns_format: madam_optax.LNSFormat | None = None
) -> Params:
  """The float weights the models run at: the params, or decoded codes."""
  if lns_format is None:
    return state.params
  return madam_optax.lns_decode_tree(
    state.params, state.max_magnitudes, lns_format
  )


def init_state(
  params: Params,
  txs: Mapping[str, optax.GradientTransformation],
  key: jax.Array,
  max_magnitudes: Params | None = None,
) -> TrainState:
  """A fresh :class:`TrainState` for ``params`` (jittable)."""
  opt_state = {c: tx.init(params[c]) for c, tx in txs.items()}
  return TrainState(
    params, opt_state, key, jnp.zeros((), jnp.int32), max_magnitudes
  )


def apply_gradients(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
  """``tx``'s update applied: the new parameters and optimizer state."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_step(
  losses: Mapping[str, Loss],
  txs: Mapping[str, optax.GradientTransformation],
  state: TrainState,
  data: Any,
  *,
  lns_format: madam_optax.LNSFormat | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update of every component, in turn; returns the new state and
  ``{"<component>_loss": value}``.

  Args:
    losses: component name -> ``loss(weights, data, key)``.
    txs: component name -> optimizer.
    state: the current state.
    data: what the losses read (a dataset they sample from with ``key``, or
      this step's batch).
    lns_format: the format of the state's LNS codes, if any.
  """
  key, *keys = jax.random.split(state.key, len(losses) + 1)
  params, opt_state, metrics = dict(state.params), dict(state.opt_state), {}
  for (component, loss_fn), k in zip(losses.items(), keys):
    others = weights(state._replace(params=params), lns_format)

    def loss_of(w, component=component, loss_fn=loss_fn, k=k, others=others):
      return loss_fn({**others, component: w}, data, k)

    if lns_format is None:
      value_and_grad = jax.value_and_grad(loss_of)
    else:
      value_and_grad = madam_optax.lns_value_and_grad(
        loss_of, state.max_magnitudes[component], lns_format
      )
    loss, grads = value_and_grad(params[component])
    params[component], opt_state[component] = apply_gradients(
      txs[component], grads, opt_state[component], params[component]
    )
    metrics[f"{component}_loss"] = loss
  return state._replace(
    params=params, opt_state=opt_state, key=key, step=state.step + 1
  ), metrics


def train_chunk(
  losses: Mapping[str, Loss],
  txs: Mapping[str, optax.GradientTransformation],
  state: TrainState,
  data: Any,
  num_steps: Any,
  *,
  lns_format: madam_optax.LNSFormat | None = None,
) -> tuple[TrainState, dict]:
  """``num_steps`` train steps in a loop; returns the summed losses.

  ``num_steps`` may be traced, so one compiled chunk serves every length.
  """
  zeros = {f"{c}_loss": jnp.zeros((), jnp.float32) for c in losses}

  def body(_, carry):
    s, sums = carry
    s, step_losses = train_step(losses, txs, s, data, lns_format=lns_format)
    return s, jax.tree.map(
      lambda a, b: a + b.astype(jnp.float32), sums, step_losses
    )

  return jax.lax.fori_loop(0, num_steps, body, (state, zeros))
