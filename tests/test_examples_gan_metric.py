"""The offline Frechet distance used to score the GAN."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from hypothesis import given, strategies as st

from madam_examples import data, gan_metric


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
      mean, cov, jnp.asarray(x.mean(0), jnp.float32),
      jnp.asarray(gan_metric._sym_sqrt(ref_cov), jnp.float32),  # pylint: disable=protected-access
      jnp.float32(np.trace(ref_cov)))
  expected = _reference_fd(x, y)
  np.testing.assert_allclose(float(fd), expected, rtol=2e-3,
                             atol=2e-3 * (1 + expected))


def test_real_digits_score_far_better_than_noise():
  ref = gan_metric.digits_reference()
  assert ref.classifier_accuracy > 0.9
  digits = data.load_digits()
  real = jnp.asarray(digits.x_test * 2 - 1)
  noise = jax.random.uniform(jax.random.key(0), real.shape, minval=-1.0,
                             maxval=1.0)
  fd_real = float(gan_metric.digits_frechet_distance(real, ref))
  fd_noise = float(gan_metric.digits_frechet_distance(noise, ref))
  assert 0 <= fd_real < 0.1 * fd_noise, (fd_real, fd_noise)
