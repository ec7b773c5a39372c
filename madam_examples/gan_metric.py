"""An offline GAN sample-quality metric: a Fréchet distance on digits.

FID (Heusel et al. 2017) compares Gaussian fits of real and generated samples
in the feature space of an ImageNet Inception network, which needs a download.
Here the feature extractor is a small MLP classifier trained (deterministically,
with Adam) on scikit-learn's bundled digits, and the distance is the same
Fréchet distance between Gaussians:

  FD = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^{1/2} S_g S_r^{1/2})^{1/2})

Lower is better; 0 means identical feature means and covariances. The numbers
are not comparable with published FIDs (different features), only between
runs that use this module. Used by the GAN task of the learning-rate study
(arXiv:2006.14560, Figure 1 used FID for its cGAN).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from madam_examples import data as data_lib
from madam_examples import models


class FeatureReference(NamedTuple):
  """A frozen feature extractor and the real data's feature statistics."""
  graphdef: Any
  params: Any
  real_mean: np.ndarray
  real_cov_sqrt: np.ndarray   # symmetric square root of the real covariance
  real_cov_trace: float
  classifier_accuracy: float  # on the held-out digits


def _sym_sqrt(cov: np.ndarray) -> np.ndarray:
  vals, vecs = np.linalg.eigh(cov)
  return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def mean_and_cov(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sample mean and (unbiased) covariance of features (N, D)."""
  mean = features.mean(axis=0)
  centred = features - mean
  return mean, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance(mean: jax.Array, cov: jax.Array, ref_mean: jax.Array,
                     ref_cov_sqrt: jax.Array, ref_cov_trace: jax.Array
                     ) -> jax.Array:
  """Fréchet distance between N(mean, cov) and the reference Gaussian.

  Pure ``jnp`` (jit- and vmap-friendly); ``tr((S_r S_g)^{1/2})`` comes from the
  eigenvalues of the symmetric matrix ``S_r^{1/2} S_g S_r^{1/2}``.
  """
  middle = ref_cov_sqrt @ cov @ ref_cov_sqrt
  middle = (middle + middle.T) / 2
  eig = jnp.linalg.eigvalsh(middle)
  cross = jnp.sum(jnp.sqrt(jnp.clip(eig, 0.0, None)))
  return (jnp.sum((mean - ref_mean) ** 2) + jnp.trace(cov) + ref_cov_trace
          - 2.0 * cross)


def features(graphdef: Any, params: Any, images: jax.Array) -> jax.Array:
  """The classifier's last hidden layer for images in [-1, 1]."""
  return nnx.merge(graphdef, params).features(images)


@functools.lru_cache(maxsize=1)
def digits_reference(steps: int = 600, seed: int = 0) -> FeatureReference:
  """Trains the digits feature classifier once (cached) and fits the real data.

  The classifier (an MLP 64-128-64-10) trains with Adam(1e-3) on the digits'
  training split (images scaled to [-1, 1]); the real statistics use all 1797
  digits.
  """
  digits = data_lib.load_digits()
  x_train = jnp.asarray(digits.x_train * 2 - 1)
  y_train = jnp.asarray(digits.y_train)
  model = models.MLP(64, (128, 64), 10, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = optax.adam(1e-3)

  def loss_fn(p, idx):
    logits = nnx.merge(graphdef, p)(x_train[idx])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y_train[idx]).mean()

  @jax.jit
  def train(p, key):
    def step(carry, k):
      p, s = carry
      idx = jax.random.randint(k, (128,), 0, x_train.shape[0])
      grads = jax.grad(loss_fn)(p, idx)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, steps))
    return p

  params = train(params, jax.random.key(seed))
  logits = nnx.merge(graphdef, params)(jnp.asarray(digits.x_test * 2 - 1))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == digits.y_test))
  real = np.concatenate([digits.x_train, digits.x_test]) * 2 - 1
  feats = np.asarray(features(graphdef, params, jnp.asarray(real)), np.float64)
  mean = feats.mean(axis=0)
  cov = np.cov(feats, rowvar=False)
  return FeatureReference(graphdef, params, mean.astype(np.float32),
                          _sym_sqrt(cov).astype(np.float32),
                          float(np.trace(cov)), accuracy)


def digits_frechet_distance(images: jax.Array,
                            reference: FeatureReference | None = None
                            ) -> jax.Array:
  """FD between generated digit images (N, 8, 8, 1) in [-1, 1] and real ones."""
  ref = reference or digits_reference()
  mean, cov = mean_and_cov(features(ref.graphdef, ref.params, images))
  return frechet_distance(mean, cov, ref.real_mean, ref.real_cov_sqrt,
                          ref.real_cov_trace)
