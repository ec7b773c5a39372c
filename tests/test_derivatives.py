"""Derivatives through the updates: ``jax.grad`` against finite differences.

Frameworks that meta-learn hyperparameters differentiate through a few
unrolled optimizer steps. Every float transform's update (``madam()``'s fused
pass, its chain of parts, the factored and first-moment variants, and each
part alone) must give the mathematical derivative with respect to the
learning rate, ``g_bound``, ``p_scale`` and the parameters: here, in float64,
within 1e-6 relative of central finite differences, at points away from the
clip and bound kinks (where the one-sided derivatives differ, central
differences would disagree).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import madam_optax

RTOL = 1e-6
STEPS = 3
# Gradient scales per step: the growth at step 2 drives |g_n| above g_bound
# (the clip acts), and the large learning rates drive some weights onto
# their bound (the bound acts), so both derivatives are exercised.
GRAD_SCALES = (0.1, 10.0, 1.0)
TARGET = np.array([[0.3, -0.1, 0.8], [0.2, 0.5, -0.4]])
WEIGHTS = np.array([[1.0, 4.0, 0.7], [3.5, 0.6, 0.5]])


def _grad_of_loss(w: jax.Array, t: int) -> jax.Array:
  """The gradient the unrolled steps feed in: of a quadratic, scaled by t."""
  return GRAD_SCALES[t] * WEIGHTS * (w - TARGET)


def _unrolled(
  make_tx: Callable[[Any, Any, Any], optax.GradientTransformation],
  lr: Any,
  g_bound: Any,
  p_scale: Any,
  w0: jax.Array,
) -> jax.Array:
  """A loss of the weights after STEPS steps of ``make_tx(lr, g_bound,
  p_scale)`` from ``w0``."""
  tx = make_tx(lr, g_bound, p_scale)
  params = {"w": w0}
  state = tx.init(params)
  for t in range(STEPS):
    grads = {"w": _grad_of_loss(params["w"], t)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return jnp.sum(jnp.asarray(WEIGHTS) * params["w"] ** 2)


W0 = np.array([[0.9, -1.7, 0.45], [0.6, -0.25, 1.3]])

# name -> (factory of lr, g_bound, p_scale; hyperparameters it depends on).
CHAIN = lambda lr, gb, ps: optax.chain(  # noqa: E731
  madam_optax.scale_by_second_moment(0.9),
  optax.clip(gb),
  madam_optax.multiplicative_step(lr),
  madam_optax.clip_weight_magnitude(ps),
)
TRANSFORMS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
  "madam": (
    lambda lr, gb, ps: madam_optax.madam(lr, g_bound=gb, p_scale=ps, b2=0.9),
    ("lr", "g_bound", "p_scale"),
  ),
  "madam_b1": (
    lambda lr, gb, ps: madam_optax.madam(
      lr, g_bound=gb / 2, p_scale=ps, b2=0.9, b1=0.5
    ),
    ("lr", "g_bound", "p_scale"),
  ),
  "madam_factored": (
    lambda lr, gb, ps: madam_optax.madam(
      lr,
      g_bound=gb,
      p_scale=ps,
      b2=0.9,
      factored=True,
      min_dim_size_to_factor=2,
    ),
    ("lr", "g_bound", "p_scale"),
  ),
  "chain": (CHAIN, ("lr", "g_bound", "p_scale")),
  "scale_by_second_moment": (
    lambda lr, gb, ps: optax.chain(
      madam_optax.scale_by_second_moment(0.9), optax.scale(-lr)
    ),
    ("lr",),
  ),
  "scale_by_moments": (
    lambda lr, gb, ps: optax.chain(
      madam_optax.scale_by_moments(0.5, 0.9), optax.scale(-lr)
    ),
    ("lr",),
  ),
  "scale_by_factored_second_moment": (
    lambda lr, gb, ps: optax.chain(
      madam_optax.scale_by_factored_second_moment(
        0.9, min_dim_size_to_factor=2
      ),
      optax.scale(-lr),
    ),
    ("lr",),
  ),
  "multiplicative_step": (
    lambda lr, gb, ps: optax.chain(
      optax.scale(0.1), madam_optax.multiplicative_step(lr)
    ),
    ("lr",),
  ),
  "clip_weight_magnitude": (
    lambda lr, gb, ps: optax.chain(
      optax.scale(-lr), madam_optax.clip_weight_magnitude(ps)
    ),
    ("lr", "p_scale"),
  ),
}
POINT = {"lr": 0.3, "g_bound": 1.2, "p_scale": 1.1}


def _central_difference(f: Callable[[float], Any], x: float) -> float:
  h = 1e-6 * max(abs(x), 1.0)
  return float((f(x + h) - f(x - h)) / (2 * h))


def _assert_close(derivative: float, reference: float, what: str) -> None:
  assert abs(derivative - reference) <= RTOL * max(abs(reference), 1e-3), (
    f"{what}: jax.grad {derivative!r}, central differences {reference!r}"
  )


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_grad_matches_finite_differences(name):
  make_tx, hypers = TRANSFORMS[name]
  with jax.enable_x64(True):
    w0 = jnp.asarray(W0, jnp.float64)

    def loss(point, w):
      return _unrolled(
        make_tx, point["lr"], point["g_bound"], point["p_scale"], w
      )

    point = {k: jnp.float64(v) for k, v in POINT.items()}
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(point, w0)
    loss = jax.jit(loss)
    for h in hypers:
      fd = _central_difference(
        lambda x, h=h: loss({**point, h: jnp.float64(x)}, w0), POINT[h]
      )
      assert fd != 0.0, f"{name}: the loss does not depend on {h} here"
      _assert_close(float(grads[0][h]), fd, f"{name}, d loss / d {h}")
    for seed in range(3):
      v = jax.random.normal(jax.random.key(seed), w0.shape, jnp.float64)
      fd = _central_difference(lambda s, v=v: loss(point, w0 + s * v), 0.0)
      _assert_close(
        float(jnp.vdot(grads[1], v)), fd, f"{name}, d loss / d w0 along v"
      )


def test_fused_derivative_of_the_update_in_w():
  """d w' / d w of one step is exp(-lr g_n sign(w)) below a fixed bound,
  and 0 on it (the fused pass takes |w| and sign(w) through bit casts)."""
  with jax.enable_x64(True):
    tx = madam_optax.madam(0.1, b2=0.9, max_magnitude=5.0)
    w = jnp.array([1.0, -2.0, 4.99], jnp.float64)
    g = jnp.array([1.0, 1.0, -1.0], jnp.float64)

    def new_w(w):
      state = tx.init({"w": w})
      u, _ = tx.update({"w": g}, state, {"w": w})
      return w + u["w"]

    jac = jnp.diag(jax.jacfwd(new_w)(w))
    # First step: g_n = sign(g); the third weight is clipped to 5.
    np.testing.assert_allclose(
      np.asarray(jac), [np.exp(-0.1), np.exp(0.1), 0.0], rtol=1e-12
    )


def test_meta_learning_a_learning_rate():
  """Optax's meta-learning pattern: the rate is learned by gradient descent
  on the loss after a few unrolled inner steps of ``madam``."""
  target = jnp.array([0.5, -2.0, 1.5, -0.25])
  w0 = jnp.array([1.0, -1.0, 1.0, -1.0])

  def inner_loss(w):
    return jnp.sum((w - target) ** 2)

  def outer_loss(log_lr):
    tx = optax.inject_hyperparams(madam_optax.madam)(
      learning_rate=jnp.exp(log_lr)
    )
    params = w0
    state = tx.init(params)
    for _ in range(5):
      updates, state = tx.update(jax.grad(inner_loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return inner_loss(params)

  meta = optax.adam(0.1)
  log_lr = jnp.log(jnp.float32(0.01))
  meta_state = meta.init(log_lr)
  step = jax.jit(jax.value_and_grad(outer_loss))
  first, d0 = step(log_lr)
  assert float(d0) < 0.0  # a larger rate helps from 0.01: a real gradient
  for _ in range(30):
    loss, d = step(log_lr)
    u, meta_state = meta.update(d, meta_state)
    log_lr = optax.apply_updates(log_lr, u)
  final, _ = step(log_lr)
  assert float(jnp.exp(log_lr)) > 0.05
  assert float(final) < 0.5 * float(first)
