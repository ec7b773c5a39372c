"""madam-optax: Madam, the multiplicative version of Adam, as Optax transforms.

Reference: Bernstein et al., "Learning compositional functions via
multiplicative weight updates", NeurIPS 2020, arXiv:2006.14560.
"""

# pylint: disable=g-importing-member
from madam_optax._src.alias import lns_madam
from madam_optax._src.alias import lns_madam_reference
from madam_optax._src.alias import madam
from madam_optax._src.factored_second_moment import (
  ScaleByFactoredSecondMomentState,
)
from madam_optax._src.factored_second_moment import (
  scale_by_factored_second_moment,
)
from madam_optax._src.finite_guard import apply_if_finite
from madam_optax._src.lns import REFERENCE_FORMAT
from madam_optax._src.lns import LNSFormat
from madam_optax._src.lns import lns_decode
from madam_optax._src.lns import lns_encode
from madam_optax._src.lns import lns_scale
from madam_optax._src.lns_level_step import LNSLevelStepState
from madam_optax._src.lns_level_step import lns_level_step
from madam_optax._src.lns_tree import lns_decode_tree
from madam_optax._src.lns_tree import lns_encode_tree
from madam_optax._src.lns_tree import lns_value_and_grad
from madam_optax._src.log_quantise import LogQuantiseState
from madam_optax._src.log_quantise import log_quantise
from madam_optax._src.magnitude_bound import ClipWeightMagnitudeState
from madam_optax._src.magnitude_bound import clip_weight_magnitude
from madam_optax._src.magnitude_bound import initial_max_magnitude
from madam_optax._src.moments import ScaleByMomentsState
from madam_optax._src.moments import scale_by_moments
from madam_optax._src.multiplicative_step import MultiplicativeStepState
from madam_optax._src.multiplicative_step import multiplicative_step
from madam_optax._src.partition import ADDITIVE_LEARNING_RATE
from madam_optax._src.partition import ADDITIVE_NAMES
from madam_optax._src.partition import madam_labels
from madam_optax._src.partition import multiplicative_labels
from madam_optax._src.partition import partitioned_madam
from madam_optax._src.partition import with_additive_fallback
from madam_optax._src.second_moment import ScaleBySecondMomentState
from madam_optax._src.second_moment import scale_by_second_moment
from madam_optax._src.state_sharding import state_shardings

__version__ = "0.2.0.dev0"


def initial_rms_bound(params, p_scale=3.0):
  """Deprecated alias of :func:`initial_max_magnitude` (one release)."""
  import warnings  # pylint: disable=g-import-not-at-top

  warnings.warn(
    "madam_optax.initial_rms_bound is deprecated; use "
    "madam_optax.initial_max_magnitude (the same w_max).",
    DeprecationWarning,
    stacklevel=2,
  )
  return initial_max_magnitude(params, p_scale)


__all__ = (
  "ADDITIVE_LEARNING_RATE",
  "ADDITIVE_NAMES",
  "ClipWeightMagnitudeState",
  "LNSFormat",
  "LNSLevelStepState",
  "LogQuantiseState",
  "MultiplicativeStepState",
  "REFERENCE_FORMAT",
  "ScaleByFactoredSecondMomentState",
  "ScaleByMomentsState",
  "ScaleBySecondMomentState",
  "apply_if_finite",
  "clip_weight_magnitude",
  "initial_max_magnitude",
  "initial_rms_bound",
  "lns_decode",
  "lns_decode_tree",
  "lns_encode",
  "lns_encode_tree",
  "lns_level_step",
  "lns_madam",
  "lns_madam_reference",
  "lns_scale",
  "lns_value_and_grad",
  "log_quantise",
  "madam",
  "madam_labels",
  "multiplicative_labels",
  "multiplicative_step",
  "partitioned_madam",
  "scale_by_factored_second_moment",
  "scale_by_moments",
  "scale_by_second_moment",
  "state_shardings",
  "with_additive_fallback",
)
