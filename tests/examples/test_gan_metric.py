"""The offline Frechet distance used to score the GAN."""

from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from madam_examples import gan_metric
from madam_examples import models


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
