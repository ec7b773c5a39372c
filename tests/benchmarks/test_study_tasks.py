"""The study's GAN task and its offline Fréchet distance
(``benchmarks/study_tasks.py``)."""

import chex
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from madam_examples import data
from madam_examples import models
from tests.benchmarks.conftest import load_benchmark
from tests.examples.test_tasks import _train

gan_metric = load_benchmark("study_tasks")
tasks = gan_metric


def _reference_fd(x, y):
  m1, m2 = x.mean(0), y.mean(0)
  c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  cross = scipy.linalg.sqrtm(c1 @ c2).real
  return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross))


@given(st.integers(0, 2**16), st.floats(0.0, 2.0))
def test_frechet_distance_matches_scipy(seed, shift):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(200, 4))
  y = rng.normal(size=(150, 4)) @ rng.normal(size=(4, 4)) * 0.5 + shift
  ref_cov = np.cov(x, rowvar=False)
  mean, cov = gan_metric.mean_and_cov(jnp.asarray(y, jnp.float32))
  fd = gan_metric.frechet_distance(
    mean,
    cov,
    jnp.asarray(x.mean(0), jnp.float32),
    jnp.asarray(gan_metric._sym_sqrt(ref_cov), jnp.float32),  # pylint: disable=protected-access
    jnp.float32(np.trace(ref_cov)),
  )
  expected = _reference_fd(x, y)
  np.testing.assert_allclose(
    float(fd), expected, rtol=2e-3, atol=2e-3 * (1 + expected)
  )


def test_fit_reference_puts_its_own_images_at_distance_zero():
  graphdef, params = nnx.split(models.MLP(4, (16, 3), 2, rngs=nnx.Rngs(0)))
  real = np.random.default_rng(0).normal(size=(400, 4)).astype(np.float32)
  ref = gan_metric.fit_reference(graphdef, params, real, 0.75)
  assert ref.classifier_accuracy == 0.75 and ref.real_mean.shape == (3,)
  same = float(gan_metric.reference_frechet_distance(jnp.asarray(real), ref))
  shifted = float(
    gan_metric.reference_frechet_distance(jnp.asarray(real) + 1.0, ref)
  )
  assert abs(same) < 1e-3 * ref.real_cov_trace < shifted, (same, shifted)


def test_gan_discriminator_learns_and_generator_moves():
  task = tasks.build_task("gan", quick=True)
  d_loss = jax.jit(task.losses["discriminator"])
  key = jax.random.key(7)
  before, after, sums = _train(task)
  assert np.isfinite(sums["discriminator_loss"])
  assert np.isfinite(sums["generator_loss"])
  # Against the initial generator's samples, the trained discriminator's
  # loss is lower than the initial discriminator's.
  trained_d = {**before.params, "discriminator": after.params["discriminator"]}
  assert (
    float(d_loss(trained_d, task.data, key))
    < float(d_loss(before.params, task.data, key)) - 0.05
  )
  moved = jax.tree.map(
    lambda a, b: jnp.any(a != b),
    before.params["generator"],
    after.params["generator"],
  )
  assert all(jax.tree.leaves(moved))
  fd = float(
    jax.jit(task.evaluate)(after.params, task.data)["frechet_distance"]
  )
  assert np.isfinite(fd) and fd > 0
  chex.assert_trees_all_equal_structs(before, after)


def test_real_digits_score_far_better_than_noise():
  ref = tasks.digits_feature_reference()
  assert ref.classifier_accuracy > 0.9
  digits = data.load_digits(standardise=False)
  real = jnp.asarray(digits.x_test * 2 - 1)
  noise = jax.random.uniform(
    jax.random.key(0), real.shape, minval=-1.0, maxval=1.0
  )
  fd_real = float(gan_metric.reference_frechet_distance(real, ref))
  fd_noise = float(gan_metric.reference_frechet_distance(noise, ref))
  assert 0 <= fd_real < 0.1 * fd_noise, (fd_real, fd_noise)


def test_gan_models_shapes():
  gen = gan_metric.Generator(6, (8, 8, 1), hidden=16, rngs=nnx.Rngs(0))
  disc = gan_metric.Discriminator(64, hidden=16, rngs=nnx.Rngs(1))
  images = gen(jnp.ones((3, 6)))
  chex.assert_shape(images, (3, 8, 8, 1))
  assert float(jnp.abs(images).max()) <= 1.0
  chex.assert_shape(disc(images), (3,))


def test_the_gan_refuses_data():
  with pytest.raises(ValueError, match="drop --data"):
    tasks.build_task("gan", data_path="x")
