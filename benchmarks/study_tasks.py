"""The learning-rate study's GAN task and its Fréchet metric (study only).

The study (``benchmarks/lr_sweep.py``) trains the paper's four families
(arXiv:2006.14560, Figure 1); the examples' tasks
(:mod:`madam_examples.tasks`) are three of them, and this module adds the
fourth: an MLP GAN on scikit-learn's digits with non-saturating losses,
scored by an offline Fréchet distance.

FID (Heusel et al. 2017) compares Gaussian fits of real and generated samples
in the feature space of an ImageNet Inception network, which needs a download.
Here the feature extractor is a small MLP classifier trained (deterministically,
with Adam) on the bundled digits (:func:`digits_feature_reference`), and the
distance is the same Fréchet distance between Gaussians:

  FD = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^{1/2} S_g S_r^{1/2})^{1/2})

Lower is better; 0 means identical feature means and covariances. The numbers
are not comparable with published FIDs (different features), only between
runs that use this module.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from madam_examples import data
from madam_examples import loop
from madam_examples import models
from madam_examples import tasks
from madam_examples.cli import QUICK_STEPS
from madam_examples.cli import InputError

TASKS = (*tasks.TASKS, "gan")
GAN_STEPS = 1000  # the GAN's training steps by default (quick: QUICK_STEPS)


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


class Generator(nnx.Module):
  """Noise (N, latent) to images (N, H, W, C) in [-1, 1] through an MLP."""

  def __init__(
    self,
    latent: int,
    image_shape: Sequence[int],
    hidden: int = 128,
    *,
    rngs: nnx.Rngs,
  ):
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


def _digits_in_unit_range() -> data.ImageData:
  """The digits scaled to [-1, 1] (the generator's tanh range)."""
  digits = data.load_digits(standardise=False)
  return digits._replace(
    x_train=digits.x_train * 2 - 1, x_test=digits.x_test * 2 - 1
  )


@functools.lru_cache(maxsize=1)
def digits_feature_reference(
  steps: int = 600, seed: int = 0
) -> FeatureReference:
  """The GAN metric's feature classifier, trained once (cached).

  An MLP 64-128-64-10 trained with Adam(1e-3), batch 128, on the digits'
  training split in [-1, 1]; the real statistics use all 1797 digits.
  """
  digits = _digits_in_unit_range()
  task = tasks.classification_task(
    "digits_features",
    "digits classifier for the GAN metric",
    digits,
    lambda r: models.MLP(64, (128, 64), 10, rngs=r),
    batch_size=128,
    steps=steps,
    eval_every=steps,
  )
  state, history = loop.train(
    task, "adam", 1e-3, seed=seed, schedule="constant"
  )
  real = np.concatenate([digits.x_train, digits.x_test])
  return fit_reference(
    task.graphdefs["model"],
    state.params["model"],
    real,
    float(history["accuracy"][-1]) / 100.0,
  )


def gan_task(
  *,
  latent: int,
  batch_size: int,
  steps: int,
  eval_every: int,
  eval_samples: int = 1000,
) -> loop.Task:
  """An MLP GAN on the digits with non-saturating losses.

  Metric: the Fréchet distance of ``eval_samples`` generated digits to the
  real ones in the features of :func:`digits_feature_reference`.
  """
  digits = _digits_in_unit_range()
  shape = digits.x_train.shape[1:]
  g_def, g_init = tasks._init_fn(lambda r: Generator(latent, shape, rngs=r))
  d_def, d_init = tasks._init_fn(
    lambda r: Discriminator(int(np.prod(shape)), rngs=r)
  )
  ref = digits_feature_reference()
  data = {
    "real": jnp.asarray(digits.x_train),
    "z_eval": jax.random.normal(jax.random.key(1234), (eval_samples, latent)),
    "fd": {
      "params": ref.params,
      "mean": jnp.asarray(ref.real_mean),
      "cov_sqrt": jnp.asarray(ref.real_cov_sqrt),
      "cov_trace": jnp.asarray(ref.real_cov_trace),
    },
  }

  def fake(weights, key):
    z = jax.random.normal(key, (batch_size, latent))
    return nnx.merge(g_def, weights["generator"])(z)

  # Non-saturating GAN losses (Goodfellow et al. 2014).
  def d_loss(weights, data, key):
    k_real, k_fake = jax.random.split(key)
    idx = jax.random.randint(k_real, (batch_size,), 0, data["real"].shape[0])
    disc = nnx.merge(d_def, weights["discriminator"])
    fakes = jax.lax.stop_gradient(fake(weights, k_fake))
    return (
      jax.nn.softplus(-disc(data["real"][idx])).mean()
      + jax.nn.softplus(disc(fakes)).mean()
    )

  def g_loss(weights, data, key):
    disc = nnx.merge(d_def, weights["discriminator"])
    return jax.nn.softplus(-disc(fake(weights, key))).mean()

  def evaluate(weights, data):
    images = nnx.merge(g_def, weights["generator"])(data["z_eval"])
    fd = data["fd"]  # the reference's arrays, passed in like all data
    reference = ref._replace(
      params=fd["params"],
      real_mean=fd["mean"],
      real_cov_sqrt=fd["cov_sqrt"],
      real_cov_trace=fd["cov_trace"],
    )
    return {"frechet_distance": reference_frechet_distance(images, reference)}

  def init(key):
    kg, kd = jax.random.split(key)
    return {"discriminator": d_init(kd), "generator": g_init(kg)}

  return loop.Task(
    "gan",
    "MLP GAN on digits (Frechet distance, classifier features)",
    "frechet_distance",
    False,
    3.0,
    steps,
    eval_every,
    {"discriminator": d_def, "generator": g_def},
    init,
    {"discriminator": d_loss, "generator": g_loss},
    evaluate,
    data,
  )


def build_task(name: str, *, quick: bool = False, **kwargs: Any) -> loop.Task:
  """:func:`madam_examples.tasks.build_task`, or the GAN for ``"gan"``."""
  if name != "gan":
    return tasks.build_task(name, quick=quick, **kwargs)
  if kwargs.get("data_path"):
    raise InputError("the gan task trains on the digits only; drop --data.")
  return gan_task(
    latent=16,
    batch_size=64,
    steps=QUICK_STEPS if quick else GAN_STEPS,
    eval_every=100,
    eval_samples=300 if quick else 1000,
  )
