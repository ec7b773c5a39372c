"""``madam_labels`` and ``partitioned_madam``: the Transformer recipe.

Madam trains the hidden weight matrices; embeddings, the output head, norms,
biases and all-zero leaves go to an additive optimizer, which can change
their signs (SPEC, "Beyond the paper"). Each framework's own small
Transformer-shaped model: Flax NNX (through ``nnx.Optimizer``), Flax linen
and Equinox (filtered, with ``None`` leaves).
"""

import equinox as eqx
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax

VOCAB, CONTEXT, DIM = 11, 8, 16
M, A = "multiplicative", "additive"


def _tokens(n=32, seed=0):
  """Windows of a learnable sequence: each token is the previous one + 1."""
  starts = np.random.default_rng(seed).integers(0, VOCAB, (n, 1))
  return jnp.asarray((starts + np.arange(CONTEXT + 1)) % VOCAB)


def _next_token_loss(logits, windows):
  return optax.softmax_cross_entropy_with_integer_labels(
    logits, windows[:, 1:]
  ).mean()


# --------------------------------------------------------------------------
# Flax NNX


class NNXLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(
      VOCAB, DIM, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )
    self.position = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (CONTEXT, DIM))
    )
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
    self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[-1]]
    x = x + self.down(jax.nn.gelu(self.up(self.norm(x))))
    return self.head(x)


def test_nnx_labels():
  model = NNXLM(nnx.Rngs(0))
  labels = madam_optax.madam_labels(nnx.state(model, nnx.Param))
  assert nnx.to_pure_dict(labels) == {
    "embed": {"embedding": A},
    "position": A,
    "norm": {"scale": A, "bias": A},
    "up": {"kernel": M, "bias": A},
    "down": {"kernel": M, "bias": A},
    "head": {"kernel": A},
  }


def test_nnx_optimizer_trains_and_only_additive_leaves_change_sign():
  model = NNXLM(nnx.Rngs(0))
  before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tx = madam_optax.partitioned_madam(
    nnx.state(model, nnx.Param), 0.05, additive_learning_rate=0.02
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  windows = _tokens()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return _next_token_loss(model(windows[:, :-1]), windows)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def flipped(a, b):
    return float(np.mean(np.sign(a) != np.sign(b)))

  # The hidden kernels moved, keeping every sign (Madam) ...
  for name in ("up", "down"):
    assert flipped(before[name]["kernel"], after[name]["kernel"]) == 0.0
    assert not np.array_equal(before[name]["kernel"], after[name]["kernel"])
  # ... while Adam moved the embeddings across zero.
  assert flipped(before["embed"]["embedding"], after["embed"]["embedding"]) > 0
  assert flipped(before["position"], after["position"]) > 0


# --------------------------------------------------------------------------
# Flax linen


class LinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM)(tokens)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (CONTEXT, DIM)
    )
    x = x + pos[: tokens.shape[-1]]
    h = nn.Dense(4 * DIM)(nn.LayerNorm()(x))
    x = x + nn.Dense(DIM)(jax.nn.gelu(h))
    return nn.Dense(VOCAB, use_bias=False, name="head")(x)


def test_linen_labels_and_a_training_run():
  model = LinenLM()
  windows = _tokens()
  params = model.init(jax.random.key(0), windows[:, :-1])["params"]
  labels = madam_optax.madam_labels(params)
  assert labels == {
    "Embed_0": {"embedding": A},
    "pos_embedding": A,
    "LayerNorm_0": {"scale": A, "bias": A},
    "Dense_0": {"kernel": M, "bias": A},
    "Dense_1": {"kernel": M, "bias": A},
    "head": {"kernel": A},
  }
  tx = madam_optax.partitioned_madam(params, 0.05)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
      lambda p: _next_token_loss(
        model.apply({"params": p}, windows[:, :-1]), windows
      )
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------
# Equinox


class EqxLM(eqx.Module):
  emb: eqx.nn.Embedding
  norm: eqx.nn.LayerNorm
  layers: list
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    self.emb = eqx.nn.Embedding(VOCAB, DIM, key=k1)
    self.norm = eqx.nn.LayerNorm(DIM)
    self.layers = [
      eqx.nn.Linear(DIM, 4 * DIM, key=k2),
      eqx.nn.Linear(4 * DIM, DIM, key=k3),
    ]
    self.head = eqx.nn.Linear(DIM, VOCAB, use_bias=False, key=k4)

  def __call__(self, token):
    x = self.emb(token)
    h = jax.nn.gelu(self.layers[0](self.norm(x)))
    return self.head(x + self.layers[1](h))


def test_equinox_labels_and_a_training_run():
  model = EqxLM(jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  labels = madam_optax.madam_labels(params)
  assert labels.emb.weight == A and labels.head.weight == A
  assert labels.norm.weight == A and labels.norm.bias == A
  assert [layer.weight for layer in labels.layers] == [M, M]
  assert [layer.bias for layer in labels.layers] == [A, A]
  assert labels.head.bias is None  # no bias: a None leaf, kept

  tx = madam_optax.partitioned_madam(params, 0.05)
  state = tx.init(params)
  windows = _tokens()

  @eqx.filter_jit
  def step(model, state):
    def loss_fn(model):
      logits = jax.vmap(jax.vmap(model))(windows[:, :-1])
      return _next_token_loss(logits, windows)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, state = tx.update(
      grads, state, eqx.filter(model, eqx.is_inexact_array)
    )
    return eqx.apply_updates(model, updates), state, loss

  losses = []
  for _ in range(30):
    model, state, loss = step(model, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------
# The policy itself


def test_zero_leaf_labels_are_one_case_of_the_policy():
  params = {
    "embed": {"embedding": jnp.ones((4, 2))},
    "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
    "scale": jnp.ones(2),
    "frozen": None,
  }
  for min_ndim in (0, 1, 2):
    assert madam_optax.madam_labels(
      params, additive_names=(), min_ndim=min_ndim
    ) == madam_optax.multiplicative_labels(params, min_ndim=min_ndim)
  assert madam_optax.multiplicative_labels(params)["embed"] == {"embedding": M}
  assert madam_optax.madam_labels(params) == {
    "embed": {"embedding": A},
    "dense": {"kernel": M, "bias": A},
    "scale": A,
    "frozen": None,
  }


def test_names_are_matched_case_insensitively_on_any_key_of_the_path():
  w = jnp.ones((3, 3))
  params = {
    "wte": w,
    "wpe": w,
    "h": [{"ln_1": {"g": w}, "mlp": {"c_fc": w}}],
    "ln_f": {"w": w},
    "lm_head": w,
    "Encoder": {"LayerNorm_0": {"w": w}, "attn": {"heads": w}},
  }
  assert madam_optax.madam_labels(params) == {
    "wte": A,
    "wpe": A,
    "h": [{"ln_1": {"g": A}, "mlp": {"c_fc": M}}],
    "ln_f": {"w": A},
    "lm_head": A,
    "Encoder": {"LayerNorm_0": {"w": A}, "attn": {"heads": M}},
  }
  custom = madam_optax.madam_labels(params, additive_names=(r"^c_fc$",))
  assert custom["h"][0]["mlp"]["c_fc"] == A and custom["wte"] == M


def test_integer_codes_stay_multiplicative_whatever_their_name():
  codes = {"embed": jnp.ones((4, 2), jnp.int8), "b": jnp.zeros(2, jnp.int8)}
  assert madam_optax.madam_labels(codes) == {"embed": M, "b": M}


def test_labels_need_concrete_params():
  with pytest.raises(ValueError, match="concrete initial parameters"):
    jax.jit(madam_optax.madam_labels)({"w": jnp.ones((2, 2))})


def test_partitioned_madam_steps_each_part_by_its_rule():
  params = {"embed": -jnp.ones((3, 2)), "dense": {"kernel": jnp.ones((2, 2))}}
  tx = madam_optax.partitioned_madam(params, 0.01, additive_tx=optax.sgd(0.1))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates["embed"], -0.1)  # sgd, additive
  # Madam at t = 1: g_n = sign(g), w * expm1(-lr).
  np.testing.assert_allclose(
    updates["dense"]["kernel"], jnp.expm1(-0.01), rtol=1e-6
  )


def test_partitioned_madam_default_additive_optimizer_is_adam():
  params = {"embed": jnp.full((3, 2), 0.5), "w": jnp.ones((2, 2))}
  tx = madam_optax.partitioned_madam(params, 0.01)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * sign(g).
  np.testing.assert_allclose(
    updates["embed"], -madam_optax.ADDITIVE_LEARNING_RATE, rtol=1e-4
  )


def test_partitioned_madam_passes_madam_options_and_schedules():
  params = {"w": jnp.full((2, 2), 0.5), "bias": jnp.zeros(2)}
  tx = madam_optax.partitioned_madam(
    params,
    optax.constant_schedule(0.1),
    additive_learning_rate=optax.constant_schedule(0.1),
    p_scale=1.0,
  )
  grads = {"w": -jnp.ones((2, 2)), "bias": -jnp.ones(2)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # exp(0.1) * 0.5 exceeds p_scale * RMS = 0.5: the bound holds it at 0.5.
  np.testing.assert_allclose(updates["w"], 0.0, atol=1e-7)
  np.testing.assert_allclose(updates["bias"], 0.1, rtol=1e-4)
