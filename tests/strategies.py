"""Hypothesis strategies the property tests share: float32 values and
weight vectors of ``N`` entries, and learning rates."""

from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import numpy as np

N = 12
F32_MAX = float(np.finfo(np.float32).max)

finite_f32 = st.floats(
  -F32_MAX, F32_MAX, allow_nan=False, allow_infinity=False, width=32
)
# XLA flushes float32 subnormals to zero; (1 - b2)**0.5 * g is subnormal for
# |g| below about 4e-37, and such gradients count as zero (documented).
normal_f32 = finite_f32.filter(lambda x: x == 0 or abs(x) >= 1e-30)
moderate_f32 = st.floats(-1e3, 1e3, allow_nan=False, width=32)
# Weights: ordinary, zero and tiny (1e-20) values. XLA flushes float32
# subnormals to zero, so magnitudes below 1e-30 are left out (to the tests
# of finite input, which draw any float32).
weights = hnp.arrays(
  np.float32,
  (N,),
  elements=st.one_of(
    moderate_f32,
    st.just(0.0),
    st.floats(-1e-20, 1e-20).map(np.float32).map(float),
  ).filter(lambda x: x == 0 or abs(x) >= 1e-30),
)
learning_rates = st.floats(1e-4, 1.0)
