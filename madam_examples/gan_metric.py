"""An offline GAN sample-quality metric: a Fréchet distance on digits.

FID (Heusel et al. 2017) compares Gaussian fits of real and generated samples
in the feature space of an ImageNet Inception network, which needs a download.
Here the feature extractor is a small MLP classifier trained (deterministically,
with Adam) on scikit-learn's bundled digits
(:func:`madam_examples.tasks.digits_feature_reference`), and the distance is
the same Fréchet distance between Gaussians:

  FD = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^{1/2} S_g S_r^{1/2})^{1/2})

Lower is better; 0 means identical feature means and covariances. The numbers
are not comparable with published FIDs (different features), only between
runs that use this module. Used by the GAN task of the learning-rate study
(arXiv:2006.14560, Figure 1 used FID for its cGAN).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


class FeatureReference(NamedTuple):
  """A frozen feature extractor and the real data's feature statistics."""

  graphdef: Any
  params: Any
  real_mean: np.ndarray
  real_cov_sqrt: np.ndarray  # symmetric square root of the real covariance
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


def frechet_distance(
  mean: jax.Array,
  cov: jax.Array,
  ref_mean: jax.Array,
  ref_cov_sqrt: jax.Array,
  ref_cov_trace: jax.Array,
) -> jax.Array:
  """Fréchet distance between N(mean, cov) and the reference Gaussian.

  Pure ``jnp`` (jit- and vmap-friendly); ``tr((S_r S_g)^{1/2})`` comes from the
  eigenvalues of the symmetric matrix ``S_r^{1/2} S_g S_r^{1/2}``.
  """
  middle = ref_cov_sqrt @ cov @ ref_cov_sqrt
  middle = (middle + middle.T) / 2
  eig = jnp.linalg.eigvalsh(middle)
  cross = jnp.sum(jnp.sqrt(jnp.clip(eig, 0.0, None)))
  return (
    jnp.sum((mean - ref_mean) ** 2)
    + jnp.trace(cov)
    + ref_cov_trace
    - 2.0 * cross
  )


def features(graphdef: Any, params: Any, images: jax.Array) -> jax.Array:
  """The classifier's last hidden layer for images in [-1, 1]."""
  return nnx.merge(graphdef, params).features(images)


def fit_reference(
  graphdef: Any,
  params: Any,
  real_images: np.ndarray,
  classifier_accuracy: float,
) -> FeatureReference:
  """Freezes a trained classifier and fits the real images' features.

  Args:
    graphdef, params: the classifier (a model with a ``features`` method,
      e.g. :class:`madam_examples.models.MLP`), split with ``nnx.split``.
    real_images: the real images, in the range the generator draws.
    classifier_accuracy: the classifier's held-out accuracy (a fraction),
      kept for reports.

  Returns:
    The :class:`FeatureReference`: feature mean, covariance square root and
    trace of the real images (in float64, then stored as float32).
  """
  feats = np.asarray(
    features(graphdef, params, jnp.asarray(real_images)), np.float64
  )
  cov = np.cov(feats, rowvar=False)
  return FeatureReference(
    graphdef,
    params,
    feats.mean(axis=0).astype(np.float32),
    _sym_sqrt(cov).astype(np.float32),
    float(np.trace(cov)),
    classifier_accuracy,
  )


def reference_frechet_distance(
  images: jax.Array, reference: FeatureReference
) -> jax.Array:
  """FD between generated images and the real ones of ``reference``."""
  mean, cov = mean_and_cov(
    features(reference.graphdef, reference.params, images)
  )
  return frechet_distance(
    mean,
    cov,
    reference.real_mean,
    reference.real_cov_sqrt,
    reference.real_cov_trace,
  )
